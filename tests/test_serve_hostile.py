"""`ois-deploy serve` against careless and hostile clients (issue 33), over raw loopback sockets:
oversized bodies and heads, idle and slow sockets, descriptors run out, a full queue, abandoned
requests, bad options. Each case is bounded in sockets, bytes and seconds.

The API-level cases every deployment shares (the key, the page behind it, images, status codes)
are in serve_contract.py; these are about the server process of `serve` (uvicorn)."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

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
    assert code == 0 and "Traceback" not in log, log


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


def test_upload_bodies_held_at_once_are_bounded(guarded):
    """Upload bodies are held until encoded: 8 x --max-body-mb of them at once. With eight nearly
    whole 1 MB bodies held, a ninth upload gets 503 + Retry-After; once they go, it is taken."""
    _, url = guarded
    data, _ = scene(16)
    part = b"\x89PNG" + bytes((1 << 20) - 1000)
    held = [socket.create_connection(address(url)) for _ in range(8)]
    try:
        for sock in held:  # all but the last bytes, then nothing (for less than the read timeout)
            sock.sendall(f"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: {len(part) + 10}\r\n\r\n".encode()
                         + part)
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/images", content=data)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "retry" in r.json()["error"]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.post(f"{url}/v1/images", content=data).status_code == 200


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
