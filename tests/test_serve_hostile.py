"""`ois-deploy serve` against careless and hostile clients (issue 33), over raw loopback sockets:
oversized bodies and heads, idle and slow sockets, descriptors run out, a full queue, abandoned
requests, bad options. Each case is bounded in sockets, bytes and seconds.

The API-level cases every deployment shares (the key, the page behind it, images, status codes)
are in serve_contract.py; these are about the server process of `serve` (uvicorn)."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_contract import scene  # noqa: E402
from test_serve import URL, assert_one_line_error, run_cli, stop  # noqa: E402

READ_TIMEOUT = 1.5  # seconds: the guarded server's --read-timeout
MASKS = "/v1/images/" + "0" * 64 + "/masks"  # any id: the body is refused before the image is looked up


def start(export, *args: str, preexec_fn=None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ois_deploy", "serve", str(export), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    line = proc.stdout.readline()
    if not (match := URL.search(line)):
        proc.kill()
        raise AssertionError(f"serve did not start: {line}{proc.stderr.read()}")
    return proc, match.group(0)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def answer(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection or `timeout` passes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        pass
    except ConnectionResetError:
        pass
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def send_until_answered(sock: socket.socket, head: bytes, chunks, seconds: float) -> bytes:
    """Send head then chunks until the server answers (or closes), at most `seconds`."""
    sock.sendall(head)
    deadline = time.monotonic() + seconds
    sock.setblocking(False)
    try:
        for chunk in chunks:
            if time.monotonic() > deadline:
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            sock.setblocking(True)
            sock.sendall(chunk)
            sock.setblocking(False)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.setblocking(True)
    return answer(sock, 5)


@pytest.fixture(scope="module")
def guarded(tiny_export):
    """A server with a short read timeout, no queue (one model slot per core), uploads of at most
    1 MB, and an origin given with a trailing slash."""
    proc, url = start(tiny_export, "--read-timeout", str(READ_TIMEOUT), "--max-queue", "0", "--max-body-mb", "1",
                      "--allow-origin", "http://allowed.example/")
    yield proc, url
    code, log = stop(proc), proc.stderr.read()
    assert code == 0 and "Traceback" not in log and "libpng" not in log, log


# -- bodies and heads --------------------------------------------------------------------------
def test_a_48_mb_click_body_is_refused_at_once(guarded):
    """With Content-Length: 413 before a byte of the body is read; chunked: 413 after 64 KiB. The
    server's memory does not grow (it grew by 3 GB, parsing 3.6 M clicks)."""
    proc, url = guarded
    before = rss_mb(proc.pid)
    clicks = b'{"clicks": [' + b'{"x": 1, "y": 1, "positive": true}, ' * 30_000
    head = (f"POST {MASKS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {48 << 20}\r\n\r\n").encode()
    with socket.create_connection(address(url)) as sock:
        start_time = time.monotonic()
        response = send_until_answered(sock, head, [clicks[:1 << 20]] * 48, 5)
        elapsed = time.monotonic() - start_time
    assert status_of(response) == 413 and b"64 KiB" in response, response[:300]
    assert elapsed < 1.0
    head = (f"POST {MASKS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n" % (1 << 20) + clicks[:1 << 20] + b"\r\n"
    with socket.create_connection(address(url)) as sock:
        start_time = time.monotonic()
        response = send_until_answered(sock, head, [chunk] * 48, 5)
        elapsed = time.monotonic() - start_time
    assert status_of(response) == 413, response[:300]
    assert elapsed < 1.0
    assert rss_mb(proc.pid) - before < 50


def test_a_40_mb_header_gets_431_and_holds_no_memory(guarded):
    """One 40 MB header, then ten sockets each with an unterminated 3 MB header: each gets 431 and
    is closed once its head is over 64 KiB."""
    proc, url = guarded
    before = rss_mb(proc.pid)
    with socket.create_connection(address(url)) as sock:
        response = send_until_answered(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", [b"a" * (1 << 20)] * 40, 5)
    assert status_of(response) == 431 and b'"error"' in response, response[:300]
    socks = [socket.create_connection(address(url)) for _ in range(10)]
    try:
        answers = [send_until_answered(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", [b"a" * (1 << 20)] * 3, 5)
                   for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(status_of(a) == 431 for a in answers)
    assert rss_mb(proc.pid) - before < 50
    assert httpx.get(f"{url}/healthz").status_code == 200


def connect_from(url: str, source: str) -> socket.socket:
    """A connection from another loopback address (all of 127/8 is loopback): another client."""
    return socket.create_connection(address(url), source_address=(source, 0))


def test_upload_bodies_held_at_once_are_bounded(guarded):
    """Upload bodies are held until encoded: 8 x --max-body-mb of them at once, a quarter of that
    per client (IP address). Four clients holding two nearly whole 1 MB bodies each: their third
    gets 503, and a fifth client's upload too (503 + Retry-After); once they go, it is taken."""
    _, url = guarded
    data, _ = scene(16)
    part = b"\x89PNG" + bytes((1 << 20) - 1000)
    head = f"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: {len(part) + 10}\r\n\r\n".encode()
    held = [connect_from(url, f"127.0.0.{2 + i // 3}") for i in range(12)]
    try:
        for sock in held:  # all but the last bytes, then nothing (for less than the read timeout)
            sock.sendall(head + part)
        time.sleep(0.5)
        refused = [s for s in held if status_of(answer(s, 0.05)) == 503]
        assert len(refused) == 4  # the third of each client
        r = httpx.post(f"{url}/v1/images", content=data)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "retry" in r.json()["error"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.post(f"{url}/v1/images", content=data).status_code == 200


def test_one_client_cannot_hold_the_upload_budget(guarded):
    """8 x 1 MB uploads from one client, sent at once and then a byte at a time (the budget held,
    issue 41): two are held (its share), the rest refused at once; another client's upload is
    served meanwhile; the trickling ones are ended (408) after a read timeout or two, however
    fast their start was."""
    _, url = guarded
    data, _ = scene(17)
    part = b"\x89PNG" + bytes((1 << 20) - 2000)
    head = f"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: {len(part) + 1000}\r\n\r\n".encode()
    holders = [connect_from(url, "127.0.0.9") for _ in range(8)]
    try:
        t = time.monotonic()
        for sock in holders:
            sock.sendall(head + part)
        time.sleep(0.3)
        assert httpx.post(f"{url}/v1/images", content=data).status_code == 200
        answers = [b""] * len(holders)

        def trickle(i):
            answers[i] = send_until_answered(holders[i], b"", (time.sleep(0.2) or b"a" for _ in range(60)),
                                             4 * READ_TIMEOUT)

        threads = [threading.Thread(target=trickle, args=(i,)) for i in range(len(holders))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        statuses = sorted(status_of(a) for a in answers)
        assert statuses == [408, 408, 503, 503, 503, 503, 503, 503], statuses
        assert all(b"too slowly" in a for a in answers if status_of(a) == 408)
        assert time.monotonic() - t < 4 * READ_TIMEOUT + 3
    finally:
        for sock in holders:
            sock.close()


def test_idle_and_slow_sockets_are_closed_after_the_read_timeout(guarded):
    _, url = guarded
    # Idle: connected, nothing sent.
    with socket.create_connection(address(url)) as sock:
        t = time.monotonic()
        assert answer(sock, 10) == b""
        assert READ_TIMEOUT - 0.2 < time.monotonic() - t < READ_TIMEOUT + 3
    # A head sent one line every 0.5 s: progress, but the whole head is due within the timeout.
    with socket.create_connection(address(url)) as sock:
        t = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        try:
            for _ in range(20):
                sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert answer(sock, 5) == b""
        assert time.monotonic() - t < READ_TIMEOUT + 3
    # Idle after a response (keep-alive).
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        t = time.monotonic()
        response = answer(sock, 10)
        assert status_of(response) == 200 and time.monotonic() - t < READ_TIMEOUT + 3
    # A body at 1 byte per 0.3 s: 408 once it has taken longer than the timeout; a body that stops: 408.
    for pace, expected in ((0.3, b"too slowly"), (None, b"no part")):
        with socket.create_connection(address(url)) as sock:
            t = time.monotonic()
            sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\x89PNG")
            try:
                for _ in range(30 if pace else 0):
                    sock.sendall(b"a")
                    time.sleep(pace)
                    if time.monotonic() - t > READ_TIMEOUT + 3:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            response = answer(sock, 10)
            assert status_of(response) == 408 and expected in response, response
            assert time.monotonic() - t < READ_TIMEOUT + 4


def test_descriptors_run_out_yet_a_client_is_served(tiny_export):
    """The server limited to 128 descriptors, 130 sockets opened and left idle: the server keeps
    its connections under its descriptor limit by closing the ones idle the longest, and a client
    arriving after them is answered at once (not after the read timeout, set long here)."""
    def limit_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    proc, url = start(tiny_export, "--read-timeout", "60", preexec_fn=limit_fds)
    socks = []
    try:
        for _ in range(130):
            socks.append(socket.create_connection(address(url)))
            socks[-1].sendall(b"GET /healthz HTTP/1.1\r\n")  # a head begun, never finished
        time.sleep(0.5)
        t = time.monotonic()
        r = httpx.get(f"{url}/healthz", timeout=10)
        assert r.status_code == 200 and time.monotonic() - t < 5
        closed = sum(answer(s, 0.05) == b"" for s in socks[:40])  # the oldest: closed by the server
        assert closed == 40
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 128
    finally:
        for s in socks:
            s.close()
        assert stop(proc) == 0
    assert "Traceback" not in proc.stderr.read()


# -- the model queue ---------------------------------------------------------------------------
def big_image(side: int = 3000) -> bytes:
    image = np.zeros((side, side, 3), np.uint8)
    cv2.circle(image, (side // 2, side // 2), side // 4, (200, 50, 50), -1)
    return cv2.imencode(".png", image)[1].tobytes()


def replay_body(y: float, n: int = 24) -> dict:
    """n clicks along row y: a sequence no earlier request began (nothing kept to extend)."""
    return {"clicks": [{"x": 100.0 + 50 * k, "y": y, "positive": k % 2 == 0} for k in range(n)]}


def test_a_full_queue_answers_503_with_retry_after(guarded):
    """No queue, so at most one request per model slot: eight concurrent 24-click replays on a
    9 MP image; the ones over the slots get 503 and Retry-After, the others their mask."""
    _, url = guarded
    data = big_image()
    with httpx.Client(base_url=url, timeout=120) as client:
        image_id = client.post("/v1/images", content=data).json()["image_id"]
        results = [None] * 8

        def ask(i):
            with httpx.Client(base_url=url, timeout=120) as c:
                results[i] = c.post(f"/v1/images/{image_id}/masks", json=replay_body(1000.0 + i))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
        for r in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        metrics = client.get("/metrics").text
        assert re.search(r"^ois_rejected_total [1-9]", metrics, re.M)


def test_work_of_a_client_that_went_away_stops(guarded):
    """A 24-click replay on a 36 MP image (about 1 s of decodes on an idle 2-core machine), its
    client gone after 0.05 s: the server stops it before its next decode (far fewer than 24
    decodes run) and counts it abandoned."""
    _, url = guarded
    data = big_image(6000)
    with httpx.Client(base_url=url, timeout=120) as client:
        image_id = client.post("/v1/images", content=data).json()["image_id"]
        decodes = _metric(client, "ois_decodes_total")
        body = json.dumps(replay_body(2000.0)).encode()
        with socket.create_connection(address(url)) as sock:
            sock.sendall(f"POST /v1/images/{image_id}/masks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.05)
        time.sleep(3)  # longer than one decode: the thread has seen the stop
        assert _metric(client, "ois_abandoned_total") >= 1
        ran = _metric(client, "ois_decodes_total") - decodes
        assert ran < 12, ran
        assert client.get("/metrics").status_code == 200


def _metric(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} (\S+)", client.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


# -- options -----------------------------------------------------------------------------------
def test_an_origin_with_a_trailing_slash_is_the_origin(guarded):
    _, url = guarded
    r = httpx.get(f"{url}/v1/model", headers={"Origin": "http://allowed.example"})
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"


def test_bad_options_end_in_one_line(tiny_export, tmp_path):
    empty_key = subprocess.run([sys.executable, "-m", "ois_deploy", "serve", str(tiny_export), "--port", "0"],
                               capture_output=True, text=True, timeout=120, env={**os.environ, "OIS_API_KEY": ""})
    assert_one_line_error(empty_key, "OIS_API_KEY", "empty")
    assert_one_line_error(run_cli(str(tiny_export), "--api-key", "  "), "empty")
    assert_one_line_error(run_cli(str(tiny_export), "--max-body-mb", "inf"), "--max-body-mb", "finite")
    assert_one_line_error(run_cli(str(tiny_export), "--cache-mb", "inf"), "--cache-mb", "finite")
    assert_one_line_error(run_cli(str(tiny_export), "--allow-origin", "http://x.example/app"), "not an origin")
    assert_one_line_error(run_cli(str(tmp_path / "nowhere")), "export folder not found")


def test_sigterm_with_a_trickling_uploader_exits_cleanly(tiny_export):
    """SIGTERM while a client trickles an upload: the read timeout ends that request (408), the
    server exits 0 well before uvicorn's graceful-shutdown limit, without a traceback."""
    proc, url = start(tiny_export, "--read-timeout", str(READ_TIMEOUT))
    data, _ = scene(3)
    with socket.create_connection(address(url)) as sock:
        sock.sendall(f"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:100])
        time.sleep(0.2)
        t = time.monotonic()
        proc.send_signal(15)
        response = answer(sock, 15)
    assert proc.wait(timeout=30) == 0 and time.monotonic() - t < 10
    assert status_of(response) == 408
    assert "Traceback" not in proc.stderr.read()


# -- issue 41: no 5xx anywhere, slots slow clients cannot hold, fair under load --------------------
WEB = Path(__file__).resolve().parents[1] / "ois_deploy" / "web"
WASM = "/vendor/ort-wasm-simd-threaded.wasm"
needs_wasm = pytest.mark.skipif(not (WEB / WASM.lstrip("/")).is_file(), reason="ois_deploy/web/vendor is missing: make web")
ODD_PATHS = ["/", "/index.html", "/ois-client.js", "/nope", "/nope/", "//evil.example/..", "/%2fevil.example/..",
             "/" + "a" * 300, "/" + "a" * 300 + "/b", "/%00", "/..%2f..%2fetc/passwd", "/v1", "/v1/images/x",
             "/label-studio", "/label-studio/nope", "/label-studio/health", "/%ff", "/vendor"]


@pytest.fixture(scope="module")
def keyed(tiny_export):
    """--label-studio and --api-key together: the combination that answered 500s."""
    pytest.importorskip("label_studio_converter")
    proc, url = start(tiny_export, "--read-timeout", str(READ_TIMEOUT), "--api-key", "k", "--label-studio")
    yield proc, url
    code, log = stop(proc), proc.stderr.read()
    assert code == 0 and "Traceback" not in log, log


def raw_request(url: str, head: str, timeout: float = 5) -> bytes:
    with socket.create_connection(address(url)) as sock:
        sock.sendall(head.encode())
        return answer(sock, timeout)


def test_odd_paths_get_no_5xx_with_or_without_the_key(guarded, keyed):
    """Each odd path (sent as is: no client-side normalization), GET and HEAD, on the plain server
    and on one with --label-studio and --api-key: never a 5xx, an error always JSON; the page is
    served (200) without the key, an unknown path 404 (or 401 behind the key)."""
    for (_, url), key in ((guarded, None), (keyed, None), (keyed, "k")):
        for path in ODD_PATHS:
            for method in ("GET", "HEAD"):
                auth = f"Authorization: Bearer {key}\r\n" if key else ""
                response = raw_request(url, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                status = status_of(response)
                assert 200 <= status < 500, (url, key, path, method, response[:300])
                if status >= 400 and method == "GET":
                    assert b"application/json" in response.split(b"\r\n\r\n")[0], (path, response[:300])
        for page in ("/", "/index.html", "/ois-client.js"):
            assert httpx.get(f"{url}{page}").status_code == 200
    assert httpx.get(f"{keyed[1]}/nope", headers={"Authorization": "Bearer k"}).status_code == 404
    assert httpx.get(f"{keyed[1]}/{'a' * 300}").status_code == 401


def test_redirects_stay_on_the_site(guarded):
    """A folder's slash redirect goes to a path on this server, never to //evil.example."""
    _, url = guarded
    for path in ("//evil.example/..", "/%2fevil.example/..", "//evil.example/%2e%2e", "/\\evil.example/.."):
        response = raw_request(url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        location = re.search(rb"^location: (.*)\r$", response, re.M | re.I)
        assert location is None or location.group(1).startswith(b"/") and not location.group(1).startswith(b"//"), \
            (path, response[:300])


@needs_wasm
def test_a_download_slower_than_the_read_timeout_completes(guarded):
    """The 14.8 MB WASM file read at about 3 MB/s (about 5 s, over three read timeouts): complete
    (it was cut off at the read timeout: the body deadline applied after the response began)."""
    _, url = guarded
    with socket.create_connection(address(url)) as sock:
        sock.sendall(f"GET {WASM} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        t, data = time.monotonic(), b""
        sock.settimeout(10)
        while chunk := sock.recv(256 * 1024):
            data += chunk
            time.sleep(0.08)
    assert time.monotonic() - t > 2 * READ_TIMEOUT
    head, body = data.split(b"\r\n\r\n", 1)
    assert status_of(head) == 200 and len(body) == (WEB / WASM.lstrip("/")).stat().st_size


@needs_wasm
def test_a_reader_that_stops_reading_is_closed(guarded):
    """A client that asks for the WASM file and reads nothing: closed once the server's send
    buffer has stayed full for the read timeout (the send timeout), long before the file is sent."""
    _, url = guarded
    with socket.create_connection(address(url)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(f"GET {WASM} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(READ_TIMEOUT + 2)
        t, received = time.monotonic(), 0
        sock.settimeout(10)
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
    assert received < 14_000_000 and time.monotonic() - t < 5


def _limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


@needs_wasm
def test_slow_readers_and_uploaders_cannot_hold_the_slots(tiny_export):
    """Under 128 descriptors (about 40 connections), 70 downloads of the WASM file that read
    nothing and 70 uploads trickling a byte every 2 s (a read timeout of 60 s, so no timeout
    helps): a new client is still answered at once; the stalled ones are closed to make room."""
    proc, url = start(tiny_export, "--read-timeout", "60", preexec_fn=_limit_fds)
    socks = []
    try:
        for i in range(140):
            sock = socket.create_connection(address(url))
            if i % 2:
                sock.sendall(f"GET {WASM} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            else:
                sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n\x89PNG")
            socks.append(sock)
        time.sleep(1.5)  # stalled for over a second: may be closed to make room
        for _ in range(5):
            t = time.monotonic()
            assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
            assert time.monotonic() - t < 3
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 128
    finally:
        for s in socks:
            s.close()
        assert stop(proc) == 0
    log = proc.stderr.read()
    assert "Traceback" not in log and "Too many open files" not in log, log


def test_a_refusal_closes_the_connection(tiny_export):
    """An endless chunked upload without the key: 401, and the connection is closed (the server
    kept reading and discarding such a body: 9.7 GB in 10 s); the same for a 413."""
    proc, url = start(tiny_export, "--api-key", "k", "--max-body-mb", "1")
    try:
        for auth in ("", "Authorization: Bearer k\r\n"):
            with socket.create_connection(address(url)) as sock:
                sock.sendall(f"POST /v1/images HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode())
                chunk, sent, t = b"100000\r\n" + bytes(1 << 20) + b"\r\n", 0, time.monotonic()
                try:
                    while time.monotonic() - t < 10:
                        sock.sendall(chunk)
                        sent += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass
                assert time.monotonic() - t < 5 and sent < 200, sent
    finally:
        assert stop(proc) == 0


def test_the_head_limit_holds_when_the_head_comes_in_one_read(guarded):
    """A 100 KiB header sent in one piece: 431 (h11's limit caught only heads that arrive in parts,
    letting about 128 KiB through); a 60 KiB one is served."""
    _, url = guarded
    big = raw_request(url, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * (100 << 10) + "\r\n\r\n")
    assert status_of(big) == 431 and b"64 KiB" in big
    fine = raw_request(url, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + "a" * (60 << 10) + "\r\n\r\n")
    assert status_of(fine) == 200


def png_16bit_rgba(width: int, height: int, seed: int) -> bytes:
    """A 16-bit RGBA PNG, almost all one colour: a few hundred KB for 40 MP."""
    image = np.zeros((height, width, 4), np.uint16)
    image[seed: seed + 64, :64] = 65535
    return cv2.imencode(".png", image)[1].tobytes()


def test_16_bit_rgba_uploads_stay_within_the_memory_bound(tiny_export):
    """Eight different 40 MP 16-bit RGBA PNGs (about 300 KB each) posted at once: each is decoded
    straight to 8-bit RGB (3 bytes a pixel; it was a 16-bit RGBA copy first, +761 MB for one),
    in the large lane's slots: the server grows by under the bound of docs/serving.md, the cache
    and service.working_memory_bound (387 MB on 2 cores; it grew by 1.5 GB)."""
    from ois_deploy.serve.service import working_memory_bound

    proc, url = start(tiny_export, "--cache-mb", "64")
    try:
        images = [png_16bit_rgba(8000, 5000, i) for i in range(8)]
        assert max(len(d) for d in images) < 400_000
        before = rss_mb(proc.pid)
        results = [None] * 8

        def post(i):
            results[i] = httpx.post(f"{url}/v1/images", content=images[i], timeout=300)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
        with open(f"/proc/{proc.pid}/status") as f:
            peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
        bound = 64 + working_memory_bound(os.cpu_count(), 40_000_000) / (1 << 20)
        assert peak - before < bound, (before, peak, bound)
    finally:
        assert stop(proc) == 0


def test_small_images_are_served_beside_a_flood_of_large_ones(tiny_export):
    """Four threads clicking on a 36 MP image without pause (no queue: the large lane is full and
    refuses with 503) while a client clicks on a 320x240 image: every one of its clicks is
    answered 200, none refused (large images have a lane of their own)."""
    proc, url = start(tiny_export, "--max-queue", "0")
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            big_id = client.post("/v1/images", content=big_image(6000)).json()["image_id"]
            small = cv2.imencode(".png", np.full((240, 320, 3), 90, np.uint8))[1].tobytes()
            small_id = client.post("/v1/images", content=small).json()["image_id"]
            stop_flood, big_statuses = threading.Event(), []

            def flood(seed):
                rng = np.random.default_rng(seed)
                with httpx.Client(base_url=url, timeout=120) as c:
                    while not stop_flood.is_set():
                        x, y = rng.integers(0, 6000, 2).tolist()
                        big_statuses.append(c.post(f"/v1/images/{big_id}/masks",
                                                   json={"clicks": [{"x": x, "y": y}]}).status_code)

            threads = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(1)
                statuses = [client.post(f"/v1/images/{small_id}/masks",
                                        json={"clicks": [{"x": 10.0 + k, "y": 20.0}]}).status_code for k in range(20)]
            finally:
                stop_flood.set()
                for thread in threads:
                    thread.join(120)
        assert statuses == [200] * 20, statuses
        assert 503 in big_statuses and 200 in big_statuses
    finally:
        assert stop(proc) == 0


def test_abandoned_requests_release_their_threads(guarded):
    """30 replays on a 36 MP image, each abandoned after 0.05 s: the server's thread count stays
    near where it was (each left a thread blocked on a model slot: 16 -> 287 threads)."""
    proc, url = guarded
    with httpx.Client(base_url=url, timeout=120) as client:
        image_id = client.post("/v1/images", content=big_image(6000)).json()["image_id"]
    threads_before = len(os.listdir(f"/proc/{proc.pid}/task"))
    for i in range(30):
        body = json.dumps(replay_body(100.0 + i)).encode()
        with socket.create_connection(address(url)) as sock:
            sock.sendall(f"POST /v1/images/{image_id}/masks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.05)
    time.sleep(3)
    assert len(os.listdir(f"/proc/{proc.pid}/task")) <= threads_before + 4
    assert httpx.get(f"{url}/healthz").status_code == 200


# -- first-round leftovers -----------------------------------------------------------------------
def test_first_round_leftovers(guarded, tiny_export, tmp_path):
    proc, url = guarded
    data, _ = scene(5)
    jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))[1].tobytes()
    r = httpx.post(f"{url}/v1/images", content=jpeg[: len(jpeg) // 2])
    assert r.status_code == 400 and "truncated" in r.json()["error"]
    # No Content-Type: taken as JSON (an unknown image: 404, not 422 "valid dictionary").
    body = b'{"clicks": [{"x": 1, "y": 1}]}'
    response = raw_request(url, f"POST {MASKS} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                                f"Connection: close\r\n\r\n" + body.decode())
    assert status_of(response) == 404 and b"unknown image" in response, response[:300]
    # A 1,040,000 x 1 PNG: refused by its size, nothing from libpng on stderr.
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1_040_000, 1)).save(buffer, "PNG")
    wide = buffer.getvalue()
    r = httpx.post(f"{url}/v1/images", content=wide)
    assert r.status_code == 413 and "too wide" in r.json()["error"]
    # Ranges: JSON errors.
    r = httpx.get(f"{url}/index.html", headers={"Range": "bytes=abc"})
    assert r.status_code == 400 and "Range" in r.json()["error"]
    r = httpx.get(f"{url}/index.html", headers={"Range": "bytes=99999999-"})
    assert r.status_code == 416 and r.json()["error"] and r.headers["content-range"].startswith("bytes */")
    assert_one_line_error(run_cli("nope/"), "export folder not found", "nope/")
    for option in ("--max-body-mb", "--cache-mb"):
        assert_one_line_error(run_cli(str(tiny_export), option, "1e308"), option)
