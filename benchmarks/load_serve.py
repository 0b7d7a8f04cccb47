"""Load and fault runs of `ois-deploy serve` (issue 25), on loopback, bounded in count and time.

Each session posts a distinct generated scene (the held-out scenes of ois_deploy.train.scenes)
and runs N clicks of the evaluation's clicker against the scene's largest object, every click
sending the whole sequence so far. C clients (threads) take sessions from one queue.

Runs, each on a fresh server (`python -m ois_deploy serve MODEL --port 0`):
  http-C:        C = 1, 4, 16 clients, a large cache;
  inprocess-C:   the same sessions in this process, one Predictor per session on one shared
                 runner and C threads: what HTTP adds per click;
  small-cache:   --cache-mb so small that states are evicted mid-session; clients post the image
                 again on 404 and the server replays the sequence: zero errors, masks identical;
  slow-clients:  the same with two more clients that upload at about 40 KB/s throughout: the
                 others' clicks should not wait for them;
  sigkill:       the server is killed with SIGKILL mid-run and restarted on the same port;
                 clients retry (connection errors, then 404 -> post again): masks identical;
  burst:         uploads only, many distinct images at once, small cache: peak RSS against the
                 cache bound;
  hostile:       the clients beside attackers (issues 33, 41): 48 MB click bodies (with Content-Length
                 and chunked), 40 MB headers, sockets sending their head a line a second and
                 bodies a byte at a time, 24-click requests abandoned after 0.1 s, mask requests
                 on a 6000x6000 image from several threads at once, uploads of 40 MP 16-bit RGBA
                 PNGs (the memory worst case), slow readers of the 14.8 MB WASM file, and
                 upload-budget holders (8 x --max-body-mb sent at once, then a byte every 4 s);
                 the attackers run in a process of their own and connect from other loopback
                 addresses (127.0.0.2...: other clients). First the same clients alone on the same server settings ("calm"),
                 for their p99 side by side; the server's peak RSS against the bound of
                 docs/serving.md ("Memory").
Every mask is hashed; runs are compared mask for mask with the in-process run. `--runs` picks
the runs (default: all).

Another deployment (Ray Serve) reuses the client side: `--url URL --label NAME` runs the http
runs against a server that is already running (no start, kill or RSS unless --server-pid).

  python benchmarks/load_serve.py --model artifacts/ois-tiny
  python benchmarks/load_serve.py --url http://127.0.0.1:8000 --label ray-2 --clients 1,4 --out x.json

Writes benchmarks/results/serve_load_<date>.json (machine, versions, date, load average).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ois_deploy.errors import UserError, run_script
from ois_deploy.evaluate.clicker import Clicker
from ois_deploy.io import write_json
from ois_deploy.provenance import cpu_features, machine_info, now_utc, tool_versions
from ois_deploy.serve.masks import rle_decode, rle_encode
from ois_deploy.train.scenes import heldout_scene

RESULTS = Path(__file__).resolve().parent / "results"


# -- sessions --------------------------------------------------------------------------------
@dataclass
class Session:
    index: int
    data: bytes  # PNG
    gt: np.ndarray


def make_sessions(count: int, seed: int = 0) -> list[Session]:
    sessions = []
    for i in range(count):
        scene = heldout_scene(seed, i)
        ok, png = cv2.imencode(".png", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        sessions.append(Session(i, png.tobytes(), max(scene.masks, key=lambda m: m.sum())))
    return sessions


def digest(mask: np.ndarray) -> str:
    return hashlib.sha1(str(rle_encode(mask)["counts"]).encode()).hexdigest()[:16]


@dataclass
class Record:
    """What the clients of one run measured."""

    click_ms: list = field(default_factory=list)
    upload_ms: list = field(default_factory=list)
    overhead_ms: list = field(default_factory=list)  # per click: client latency - the server's decoder_ms
    decodes: int = 0
    errors: list = field(default_factory=list)
    reuploads: int = 0
    connection_retries: int = 0
    busy_retries: int = 0  # 503 + Retry-After, waited and retried
    masks: dict = field(default_factory=dict)  # "session:click" -> digest
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def clicks(self) -> int:
        return len(self.click_ms)


def run_clients(sessions: list[Session], clients: int, work) -> tuple[Record, float]:
    """work(session, record) for every session, on `clients` threads; (record, seconds)."""
    todo: queue.Queue = queue.Queue()
    for s in sessions:
        todo.put(s)
    record = Record()

    def client():
        while True:
            try:
                s = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(s, record)
            except Exception as e:  # an error of one session; the others go on
                with record.lock:
                    record.errors.append(f"session {s.index}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return record, time.perf_counter() - start


# -- the HTTP client ---------------------------------------------------------------------------
def http_work(url: str, clicks: int, deadline: float, on_click=None):
    import httpx

    local = threading.local()

    def call(method: str, path: str, record: Record, **kwargs):
        """One request, retried on connection errors (a server restarting) until the deadline."""
        while True:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=url, timeout=120)
            start = time.perf_counter()
            try:
                r = local.client.request(method, path, **kwargs)
                return r, (time.perf_counter() - start) * 1000
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                with record.lock:
                    record.connection_retries += 1
                local.client.close()
                del local.client
                time.sleep(0.2)

    def upload(s: Session, record: Record) -> str:
        while True:
            r, ms = call("POST", "/v1/images", record, content=s.data)
            if r.status_code != 503 or "retry-after" not in r.headers:
                break
            with record.lock:
                record.busy_retries += 1
            time.sleep(float(r.headers["retry-after"]))
        if r.status_code != 200:
            raise RuntimeError(f"upload: {r.status_code} {r.text}")
        with record.lock:
            record.upload_ms.append(ms)
        return r.json()["image_id"]

    def work(s: Session, record: Record) -> None:
        image_id = upload(s, record)
        clicker, pred, sequence = Clicker(s.gt), np.zeros_like(s.gt), []
        for k in range(clicks):
            c = clicker.next_click(pred)
            sequence.append({"x": c.x, "y": c.y, "positive": c.positive})
            while True:
                r, ms = call("POST", f"/v1/images/{image_id}/masks", record, json={"clicks": sequence})
                if r.status_code == 404:  # evicted, or a restarted server: post the image again
                    with record.lock:
                        record.reuploads += 1
                    image_id = upload(s, record)
                    continue
                if r.status_code == 503 and "retry-after" in r.headers:  # queue full: as a client should
                    with record.lock:
                        record.busy_retries += 1
                    time.sleep(float(r.headers["retry-after"]))
                    continue
                if r.status_code != 200:
                    raise RuntimeError(f"click {k + 1}: {r.status_code} {r.text}")
                break
            body = r.json()
            pred = rle_decode(body["mask"])
            with record.lock:
                record.click_ms.append(ms)
                record.overhead_ms.append(ms - body["decoder_ms"])  # measured at the same moment: robust to load
                record.decodes += body["decodes"]
                record.masks[f"{s.index}:{k + 1}"] = digest(pred)
            if on_click:
                on_click()

    return work


def inprocess_work(runner, clicks: int):
    from ois_deploy.runtime.predictor import Predictor
    from ois_deploy.runtime.preprocess import decode_image

    def work(s: Session, record: Record) -> None:
        predictor = Predictor(runner)
        start = time.perf_counter()
        predictor.set_image(decode_image(s.data))  # decode + encode, as the server does per upload
        with record.lock:
            record.upload_ms.append((time.perf_counter() - start) * 1000)
        clicker, pred = Clicker(s.gt), np.zeros_like(s.gt)
        for k in range(clicks):
            c = clicker.next_click(pred)
            start = time.perf_counter()
            pred = predictor.click(c.x, c.y, c.positive).mask
            ms = (time.perf_counter() - start) * 1000
            with record.lock:
                record.click_ms.append(ms)
                record.decodes += 1
                record.masks[f"{s.index}:{k + 1}"] = digest(pred)

    return work


# -- the server process --------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, model: str, args: list[str], port: int = 0):
        self.model, self.args = model, args
        self.proc, self.url = self._start(port)

    def _start(self, port: int):
        cmd = [sys.executable, "-m", "ois_deploy", "serve", self.model, "--port", str(port), *self.args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1)[0]:
                match = re.search(r"http://\S+", proc.stdout.readline())
                if match:
                    return proc, match.group(0)
        proc.kill()
        raise UserError(f"the server did not start: {' '.join(cmd)}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def status_mb(self, key: str) -> float:
        """VmHWM (peak resident set) or VmRSS of the server process, MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill_and_restart(self) -> float:
        """SIGKILL, then a new server on the same port; seconds until it listens."""
        self.proc.kill()
        self.proc.wait()
        start = time.perf_counter()
        self.proc, self.url = self._start(self.port)
        return time.perf_counter() - start

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def scrape(url: str) -> dict:
    """ois_* counters and gauges from /metrics (histograms left out)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        if family.name.startswith("ois_") and family.type in ("counter", "gauge") and not family.name.startswith("ois_http"):
            for s in family.samples:
                if not s.name.endswith("_created"):
                    values[s.name] = values.get(s.name, 0) + s.value
    return values


# -- runs --------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    p = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2), "p99": round(float(p[2]), 2),
            "mean": round(float(np.mean(values)), 2), "n": len(values)}


def summarise(label: str, kind: str, clients: int, record: Record, seconds: float, **extra) -> dict:
    result = {"label": label, "kind": kind, "clients": clients, "sessions": len({k.split(":")[0] for k in record.masks}),
              "clicks": record.clicks, "seconds": round(seconds, 2), "clicks_per_s": round(record.clicks / seconds, 2),
              "click_ms": percentiles(record.click_ms), "upload_ms": percentiles(record.upload_ms),
              **({"http_overhead_ms": percentiles(record.overhead_ms)} if record.overhead_ms else {}),
              "errors": len(record.errors), "error_messages": record.errors[:5], "reuploads": record.reuploads,
              "connection_retries": record.connection_retries, "busy_retries": record.busy_retries,
              "decodes": record.decodes, **extra}
    metrics = extra.get("server_metrics") or {}
    hits, misses = metrics.get("ois_cache_hits_total"), metrics.get("ois_cache_misses_total")
    if hits is not None and misses is not None and hits + misses:
        result["cache_hit_rate"] = round(hits / (hits + misses), 4)
    label_line = f"{label:>14}: {record.clicks} clicks, {result['clicks_per_s']} clicks/s, click p50 " \
                 f"{result['click_ms'].get('p50')} p99 {result['click_ms'].get('p99')} ms, errors {len(record.errors)}"
    if record.overhead_ms:
        label_line += f", HTTP overhead p50 {result['http_overhead_ms']['p50']} ms"
    print(label_line, flush=True)
    return result


def same_masks(a: Record, b: Record) -> dict:
    common = set(a.masks) & set(b.masks)
    return {"compared": len(common), "identical": sum(a.masks[k] == b.masks[k] for k in common),
            "all_identical": bool(common) and all(a.masks[k] == b.masks[k] for k in common)
            and set(a.masks) == set(b.masks)}


def slow_uploads(url: str, stop: threading.Event, data: bytes, chunk: int = 2048, pause: float = 0.05) -> list:
    """Post `data` over and over, a chunk every `pause` seconds, until stop: a client on a slow
    link. Its answers' status codes are returned."""
    import httpx

    def trickle():
        for i in range(0, len(data), chunk):
            yield data[i:i + chunk]
            time.sleep(pause)

    statuses = []
    with httpx.Client(base_url=url, timeout=300) as client:
        while not stop.is_set():
            statuses.append(client.post("/v1/images", content=trickle()).status_code)
    return statuses


def http_run(label, model, sessions, clients, clicks, deadline, server_args, kill_after=None,
             slow_clients=0) -> tuple[dict, Record]:
    server = ServerProcess(model, server_args)
    rss_start = server.status_mb("VmRSS")
    stop, slow, slow_statuses = threading.Event(), [], []
    for i in range(slow_clients):  # trickling uploads of the run's scenes while the clients click
        data = sessions[-1 - i].data
        slow.append(threading.Thread(target=lambda d=data: slow_statuses.extend(slow_uploads(server.url, stop, d))))
        slow[-1].start()
    killed = {}
    total = len(sessions) * clicks
    done = [0]
    lock = threading.Lock()

    def on_click():
        with lock:
            done[0] += 1
            fire = kill_after is not None and not killed and done[0] >= kill_after * total
            if fire:
                killed["at_click"] = done[0]
        if fire:  # outside the lock; the other clients see connection errors meanwhile
            killed["peak_rss_mb_before_kill"] = round(server.status_mb("VmHWM"), 1)
            killed["restart_s"] = round(server.kill_and_restart(), 2)

    try:
        record, seconds = run_clients(sessions, clients, http_work(server.url, clicks, deadline, on_click))
        peak = server.status_mb("VmHWM")
        metrics = scrape(server.url)
    finally:
        stop.set()
        for t in slow:
            t.join()
        code = server.stop()
    extra = {"server_args": server_args, "server_peak_rss_mb": round(peak, 1), "server_start_rss_mb": round(rss_start, 1),
             "server_exit_code": code, "server_metrics": metrics}
    if kill_after is not None:
        extra["sigkill"] = killed
    if slow_clients:
        extra["slow_clients"] = {"count": slow_clients, "uploads_completed": len(slow_statuses),
                                 "statuses": sorted(set(slow_statuses))}
    return summarise(label, "http", clients, record, seconds, **extra), record


def burst_run(model, sessions, clients, cache_mb, deadline) -> dict:
    args = ["--cache-mb", str(cache_mb)]
    server = ServerProcess(model, args)
    rss_start = server.status_mb("VmRSS")
    try:
        work = http_work(server.url, 0, deadline)
        run_clients(sessions[:1], 1, work)  # one upload first: the model's own first-run allocations
        rss_warm = server.status_mb("VmRSS")
        half = (len(sessions) + 1) // 2  # two bursts: a bounded process peaks no higher in the second
        record, seconds = run_clients(sessions[1:half], clients, work)
        peak_first = server.status_mb("VmHWM")
        second, seconds2 = run_clients(sessions[half:], clients, work)
        record.upload_ms += second.upload_ms
        record.errors += second.errors
        seconds += seconds2
        peak = server.status_mb("VmHWM")
        metrics = scrape(server.url)
    finally:
        server.stop()
    result = {"label": "burst", "kind": "http", "clients": clients, "uploads": len(record.upload_ms),
              "seconds": round(seconds, 2), "upload_ms": percentiles(record.upload_ms), "errors": len(record.errors),
              "cache_mb": cache_mb, "server_start_rss_mb": round(rss_start, 1), "server_warm_rss_mb": round(rss_warm, 1),
              "server_peak_rss_mb_first_half": round(peak_first, 1), "server_peak_rss_mb": round(peak, 1),
              "growth_over_warm_mb": round(peak - rss_warm, 1),
              "server_metrics": metrics}
    print(f"{'burst':>14}: {len(record.upload_ms)} uploads, RSS {rss_start:.0f}, {rss_warm:.0f} after one, peak "
          f"{peak_first:.0f} after the first half, {peak:.0f} MB after all "
          f"(cache bound {cache_mb} MB), errors {len(record.errors)}", flush=True)
    return result


# -- the hostile run ---------------------------------------------------------------------------------
def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _raw(url: str, head: bytes, parts, seconds: float = 10) -> int:
    """Send a request head and body parts on a raw socket until the server answers or closes;
    the answer's status (0: closed without one)."""
    import socket

    with socket.create_connection(_address(url), timeout=seconds) as sock:
        try:
            sock.sendall(head)
            for part in parts:
                if select.select([sock], [], [], 0)[0]:
                    break  # answered already
                sock.sendall(part)
        except OSError:
            pass
        try:
            answer = sock.recv(64)
        except OSError:
            answer = b""
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _slow_socket(url: str, stop: threading.Event, body: bool) -> dict:
    """A socket that sends its head a line a second (body=False) or its body a byte a second,
    reconnecting whenever the server closes it: how long each lasted."""
    import socket

    lasted = []
    while not stop.is_set():
        start = time.monotonic()
        try:
            with socket.create_connection(_address(url), timeout=30) as sock:
                sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\n")
                if body:
                    sock.sendall(b"Content-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    sock.sendall(b"a" if body else b"X-Slow: 1\r\n")
                    if select.select([sock], [], [], 1)[0] and not sock.recv(1024):
                        break
        except OSError:
            pass
        lasted.append(time.monotonic() - start)
    return {"connections": len(lasted), "longest_s": round(max(lasted, default=0), 1)}


def _slow_reader(url: str, stop: threading.Event, source: str, path: str) -> dict:
    """GET `path` and read it at 1 KiB/s, reconnecting whenever the server closes: how long each
    connection lasted and the bytes read."""
    import socket

    lasted, read = [], 0
    while not stop.is_set():
        start = time.monotonic()
        try:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
                sock.settimeout(30)
                sock.bind((source, 0))
                sock.connect(_address(url))
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                while not stop.is_set():
                    chunk = sock.recv(1024)
                    if not chunk:
                        break
                    read += len(chunk)
                    time.sleep(1)
        except OSError:
            pass
        lasted.append(time.monotonic() - start)
    return {"connections": len(lasted), "longest_s": round(max(lasted, default=0), 1), "bytes_read": read}


def _budget_holder(url: str, stop: threading.Event, source: str, size: int) -> dict:
    """An upload of `size` bytes announced, all but 1 KiB sent at once, then a byte every 4 s,
    over and over until stop: the statuses it got."""
    import socket

    statuses, part = {}, b"\x89PNG" + bytes(size - 1024 - 4)
    while not stop.is_set():
        status = 0
        try:
            with socket.create_connection(_address(url), timeout=30, source_address=(source, 0)) as sock:
                sock.sendall(f"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + part)
                while not stop.is_set() and not select.select([sock], [], [], 4)[0]:
                    sock.sendall(b"a")
                answer = sock.recv(64)
                status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        except OSError:
            pass
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


def _png_16bit_rgba(width: int, height: int) -> bytes:
    """A 40 MP 16-bit RGBA PNG of a few hundred KB: the costliest upload per byte (issue 41)."""
    image = np.zeros((height, width, 4), np.uint16)
    image[:64, :64] = 65535
    return cv2.imencode(".png", image)[1].tobytes()


def _attack(name: str, stop: threading.Event, results: dict, attempt) -> None:
    """attempt() -> status, over and over until stop: the statuses seen, counted."""
    counts: dict = {}
    while not stop.is_set():
        try:
            status = attempt()
        except Exception as e:  # noqa: BLE001  (an attacker's error is a result too)
            status = type(e).__name__
        counts[status] = counts.get(status, 0) + 1
    results[name] = counts


def _big_image(side: int) -> bytes:
    image = np.zeros((side, side, 3), np.uint8)
    cv2.circle(image, (side // 2, side // 2), side // 3, (200, 60, 40), -1)
    return cv2.imencode(".png", image)[1].tobytes()


WASM = "/vendor/ort-wasm-simd-threaded.wasm"


def hostile_run(label, model, sessions, clients, clicks, deadline, server_args, big_side=6000, big_threads=4,
                max_body_mb=50):
    """The legitimate clients alone ("calm"), then beside the attackers ("hostile"), each on a
    fresh server with the same arguments."""
    import httpx

    from ois_deploy.serve.app import WEB_DIR

    calm, calm_record = http_run(f"{label}calm", model, sessions, clients, clicks, deadline, server_args)
    server = ServerProcess(model, server_args)
    url, stop, attacks = server.url, threading.Event(), {}
    big_id = httpx.post(f"{url}/v1/images", content=_big_image(big_side), timeout=300).json()["image_id"]
    rss_warm = server.status_mb("VmRSS")
    masks = f"/v1/images/{big_id}/masks"
    clicks48 = b'{"clicks": [' + b'{"x": 1, "y": 1, "positive": true}, ' * 30_000
    json_head = f"POST {masks} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    rng = np.random.default_rng(0)

    def oversized():
        return _raw(url, f"{json_head}Content-Length: {48 << 20}\r\n\r\n".encode(), [clicks48[:1 << 20]] * 48)

    def oversized_chunked():
        chunk = b"%x\r\n" % (1 << 20) + clicks48[:1 << 20] + b"\r\n"
        return _raw(url, f"{json_head}Transfer-Encoding: chunked\r\n\r\n".encode(), [chunk] * 48)

    def huge_header():
        return _raw(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ", [b"a" * (1 << 20)] * 40)

    def abandoned():
        import socket

        body = ('{"clicks": [' + ", ".join(f'{{"x": {x}, "y": {y}}}' for x, y in
                                           rng.integers(0, big_side, (24, 2)).tolist()) + "]}").encode()
        with socket.create_connection(_address(url)) as sock:
            sock.sendall(f"{json_head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.1)
        time.sleep(0.5)
        return "abandoned"

    flood = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=300)

    def big_click():
        x, y = rng.integers(0, big_side, 2).tolist()
        return flood.post(f"{url}{masks}", json={"clicks": [{"x": x, "y": y}]}).status_code

    png16, seeds = _png_16bit_rgba(8000, 5000), iter(range(1 << 30))

    def big_upload():  # new bytes after the PNG's end each time: a new image id, decoded and encoded again
        return flood.post(f"{url}/v1/images", content=png16 + next(seeds).to_bytes(8, "big")).status_code

    threads = [threading.Thread(target=_attack, args=(name, stop, attacks, fn)) for name, fn in
               [("oversized_click_body", oversized), ("oversized_chunked_click_body", oversized_chunked),
                ("header_40mb", huge_header), ("abandoned_24_click_requests", abandoned),
                *[(f"big_image_clicks_{i}", big_click) for i in range(big_threads)],
                ("big_16bit_uploads", big_upload)]]
    slow = {}
    for i in range(8):
        threads.append(threading.Thread(target=lambda i=i: slow.update({f"slow_head_{i}": _slow_socket(url, stop, False)})))
        threads.append(threading.Thread(target=lambda i=i: slow.update({f"slow_body_{i}": _slow_socket(url, stop, True)})))
        if (WEB_DIR / WASM.lstrip("/")).is_file():  # the browser client's files are there (make web)
            threads.append(threading.Thread(target=lambda i=i: slow.update(
                {f"slow_reader_{i}": _slow_reader(url, stop, "127.0.0.4", WASM)})))
        threads.append(threading.Thread(target=lambda i=i: slow.update(
            {f"budget_holder_{i}": _budget_holder(url, stop, "127.0.0.5", int(max_body_mb * (1 << 20)))})))
    context = multiprocessing.get_context("fork")
    finished, out = context.Event(), context.Queue()

    def attackers():  # a process of their own: their threads do not take the clients' GIL (client-side latency)
        for t in threads:
            t.start()
        finished.wait()
        stop.set()
        for t in threads:
            t.join(120)
        out.put((attacks, slow))

    child = context.Process(target=attackers)
    child.start()
    try:
        record, seconds = run_clients(sessions, clients, http_work(url, clicks, deadline))
        peak = server.status_mb("VmHWM")
        metrics = scrape(url)
    finally:
        finished.set()
        attacks, slow = out.get(timeout=300)
        child.join(60)
        flood.close()
        code = server.stop()
    big = {k: v for k, v in attacks.items() if k.startswith("big_image")}
    attacks = {k: v for k, v in attacks.items() if not k.startswith("big_image")}
    attacks["big_image_clicks"] = {str(status): sum(c.get(status, 0) for c in big.values())
                                   for status in {s for c in big.values() for s in c}}
    attacks["slow_heads"] = {"sockets": 8, "connections": sum(v["connections"] for k, v in slow.items() if "head" in k),
                             "longest_s": max(v["longest_s"] for k, v in slow.items() if "head" in k)}
    attacks["slow_bodies"] = {"sockets": 8, "connections": sum(v["connections"] for k, v in slow.items() if "body" in k),
                              "longest_s": max(v["longest_s"] for k, v in slow.items() if "body" in k)}
    readers = [v for k, v in slow.items() if k.startswith("slow_reader")]
    if readers:
        attacks["slow_readers"] = {"sockets": len(readers), "connections": sum(v["connections"] for v in readers),
                                   "longest_s": max(v["longest_s"] for v in readers),
                                   "bytes_read": sum(v["bytes_read"] for v in readers)}
    holders = [v for k, v in slow.items() if k.startswith("budget_holder")]
    attacks["budget_holders"] = {"sockets": len(holders), **{str(status): sum(v.get(status, 0) for v in holders)
                                                              for status in {s for v in holders for s in v}}}
    if record.errors:
        print("\n".join(record.errors[:5]), flush=True)
    hostile = summarise(f"{label}hostile", "http", clients, record, seconds, server_args=server_args,
                        server_peak_rss_mb=round(peak, 1), server_warm_rss_mb=round(rss_warm, 1),
                        server_exit_code=code, server_metrics=metrics, big_image=f"{big_side}x{big_side}",
                        big_image_threads=big_threads, attacks={k: {str(s): n for s, n in v.items()} if isinstance(v, dict)
                                                                else v for k, v in attacks.items()})
    print(f"{'attacks':>14}: {attacks}", flush=True)
    return calm, calm_record, hostile, record


def memory_bound_mb(warm_rss_mb: float, cache_mb: float, max_body_mb: float = 50, max_uploads: int = 8,
                    max_image_pixels: int = 40_000_000) -> float:
    """The bound of docs/serving.md ("Memory") at these settings, on this machine's cores."""
    from ois_deploy.serve.service import working_memory_bound

    work = working_memory_bound(os.cpu_count() or 1, max_image_pixels)
    return warm_rss_mb + cache_mb + max_uploads * max_body_mb + work / (1 << 20)


def model_identity(model: str | None) -> dict:
    from ois_deploy.contract import is_export_folder, read_manifest

    if not model or not is_export_folder(model):
        return {"path": model}
    manifest = read_manifest(model)
    return {"path": model, "preset": manifest["preset"], "model_hash": manifest["model_hash"], "precision": "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/ois-tiny", help="Export folder (ois-deploy export --out DIR).")
    ap.add_argument("--clients", default="1,4,16", help="Comma-separated client counts.")
    ap.add_argument("--sessions", type=int, default=16, help="Sessions per run (distinct scenes).")
    ap.add_argument("--clicks", type=int, default=20, help="Clicks per session.")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per call (server and in-process).")
    ap.add_argument("--cache-mb", type=float, default=1024)
    ap.add_argument("--small-cache-mb", type=float, default=1, help="The small-cache run's bound (under one state).")
    ap.add_argument("--fault-clients", type=int, default=4, help="Clients of the small-cache and sigkill runs.")
    ap.add_argument("--burst", type=int, default=128, help="Uploads of the burst run (0: no burst run).")
    ap.add_argument("--runs", default="clients,small-cache,slow-clients,sigkill,burst,hostile",
                    help="Which runs (comma-separated): clients (http-C and inprocess-C), small-cache, slow-clients, "
                         "sigkill, burst, hostile. The in-process run of the first client count always runs (reference).")
    ap.add_argument("--hostile-args", default="--read-timeout 2",
                    help="Extra server arguments of the hostile run (and its calm twin).")
    ap.add_argument("--url", help="Run the http runs against this running server instead (no faults, no in-process).")
    ap.add_argument("--server-pid", type=int, help="With --url: the server's process id, for its peak RSS.")
    ap.add_argument("--label", default="", help="Prefix of the run labels (e.g. ray-2).")
    ap.add_argument("--timeout", type=float, default=1200, help="Give up retrying after this many seconds.")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/serve_load_<date>.json).")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    deadline = time.monotonic() + args.timeout
    sessions = make_sessions(args.sessions)
    prefix = f"{args.label}-" if args.label else ""
    load_before = os.getloadavg()
    runs, records = [], {}

    if args.url:
        for c in clients:
            record, seconds = run_clients(sessions, c, http_work(args.url, args.clicks, deadline))
            extra = {"url": args.url, "server_metrics": scrape(args.url)}
            if args.server_pid:
                status = Path(f"/proc/{args.server_pid}/status").read_text()
                extra["server_peak_rss_mb"] = round(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024, 1)
            runs.append(summarise(f"{prefix}http-{c}", "http", c, record, seconds, **extra))
    else:
        from ois_deploy.contract import is_export_folder
        from ois_deploy.runtime.registry import RunnerSpec, open_runner

        if not is_export_folder(args.model):
            raise UserError(f"{args.model} is not an export folder: ois-deploy export --preset ois-tiny --out {args.model}")
        server_args = ["--threads", str(args.threads), "--cache-mb", str(args.cache_mb)]
        chosen = set(args.runs.split(","))
        runner = open_runner(RunnerSpec("ort", args.model, "fp32", threads=args.threads))
        for i, c in enumerate(clients):
            if i and "clients" not in chosen:
                break
            record, seconds = run_clients(sessions, c, inprocess_work(runner, args.clicks))
            records[f"inprocess-{c}"] = record
            runs.append(summarise(f"{prefix}inprocess-{c}", "inprocess", c, record, seconds))
            if "clients" not in chosen:
                continue
            result, records[f"http-{c}"] = http_run(f"{prefix}http-{c}", args.model, sessions, c, args.clicks, deadline,
                                                    server_args)
            result["masks_vs_inprocess"] = same_masks(records[f"http-{c}"], records[f"inprocess-{c}"])
            runs.append(result)
        runner.close()
        reference = records[f"inprocess-{clients[0]}"]
        fc = args.fault_clients
        small = ["--threads", str(args.threads), "--cache-mb", str(args.small_cache_mb)]
        faults = {"small-cache": dict(server_args=small), "slow-clients": dict(slow_clients=2),
                  "sigkill": dict(kill_after=0.4)}
        for name, options in faults.items():
            if name in chosen:
                options = {"server_args": server_args, **options}
                result, record = http_run(f"{prefix}{name}", args.model, sessions, fc, args.clicks, deadline, **options)
                result["masks_vs_inprocess"] = same_masks(record, reference)
                runs.append(result)
        if "hostile" in chosen:
            hostile_args = [*server_args, *args.hostile_args.split()]
            calm, calm_record, hostile, hostile_record = hostile_run(prefix, args.model, sessions, fc, args.clicks,
                                                                     deadline, hostile_args)
            for result, record in ((calm, calm_record), (hostile, hostile_record)):
                result["masks_vs_inprocess"] = same_masks(record, reference)
                runs.append(result)
        if args.burst and "burst" in chosen:
            runs.append(burst_run(args.model, make_sessions(args.burst, seed=1), 16, 16, deadline))

    by_label = {r["label"]: r for r in runs}
    summary = {}
    for c in clients:
        h, i = by_label.get(f"{prefix}http-{c}"), by_label.get(f"{prefix}inprocess-{c}")
        if h and i:
            summary[f"click_p50_ms_http_minus_inprocess_{c}_clients"] = round(h["click_ms"]["p50"] - i["click_ms"]["p50"], 2)
        if h:
            summary[f"http_overhead_p50_ms_{c}_clients"] = h["http_overhead_ms"]["p50"]
    one, four = by_label.get(f"{prefix}http-1"), by_label.get(f"{prefix}http-4")
    if one and four:
        summary["http_clicks_per_s_4_vs_1"] = round(four["clicks_per_s"] / one["clicks_per_s"], 2)
    calm, hostile = by_label.get(f"{prefix}calm"), by_label.get(f"{prefix}hostile")
    if calm and hostile:
        bound = memory_bound_mb(hostile["server_warm_rss_mb"], args.cache_mb)
        summary["hostile"] = {"errors": hostile["errors"], "click_p99_ms_calm": calm["click_ms"]["p99"],
                              "click_p99_ms_hostile": hostile["click_ms"]["p99"],
                              "click_p99_hostile_vs_calm": round(hostile["click_ms"]["p99"] / calm["click_ms"]["p99"], 2),
                              "server_peak_rss_mb_calm": calm["server_peak_rss_mb"],
                              "server_peak_rss_mb_hostile": hostile["server_peak_rss_mb"],
                              "server_rss_bound_mb": round(bound, 1),
                              "within_bound": hostile["server_peak_rss_mb"] <= bound,
                              "masks_identical": hostile["masks_vs_inprocess"]["all_identical"]}
    summary["errors"] = sum(r["errors"] for r in runs)
    versions = tool_versions()
    isa = sorted(f for f in cpu_features() if f.startswith(("avx", "amx", "sse", "fma", "f16c", "asimd", "sve")))
    result = {"date": now_utc(), "machine": {**machine_info(), "cpu_flags": isa}, "versions": versions,
              "load_average": {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]},
              "model": model_identity(None if args.url else args.model), "clicks_per_session": args.clicks, "sessions": args.sessions,
              "threads": args.threads, "summary": summary, "runs": runs}
    out = args.out or str(RESULTS / f"serve_load_{now_utc()[:10]}.json")
    write_json(result, out)
    print(f"summary: {summary}\nwrote {out}")


if __name__ == "__main__":
    run_script(main)
