"""`ois-deploy serve`: the API v1 contract (serve_contract.py) against real server processes on
free loopback ports, and the command's own behaviour (SIGTERM, bad options)."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("pycocotools")

from serve_contract import *  # noqa: E402,F401,F403  (the contract tests and their fixtures)
from serve_contract import Server, scene  # noqa: E402

URL = re.compile(r"http://\S+")


def start_serve(model, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`python -m ois_deploy serve MODEL --port 0 ARGS`, and the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "ois_deploy", "serve", str(model), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            line = proc.stdout.readline()
            if match := URL.search(line):
                return proc, match.group(0)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"serve did not start: {proc.stderr.read()}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def cli_args(options: dict) -> list[str]:
    args = []
    for name, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            args += [f"--{name.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="session")
def launch(tiny_export):
    procs = []

    def launch(**options) -> Server:
        proc, url = start_serve(tiny_export, *cli_args(options))
        procs.append(proc)
        return Server(url, tiny_export, api_key=options.get("api_key"))

    yield launch
    for proc in procs:
        assert stop(proc) == 0


def test_sigterm_finishes_requests_in_flight(tiny_export):
    proc, url = start_serve(tiny_export)
    data, _ = scene(11)
    half = threading.Event()

    def body():  # half the image, then the rest once SIGTERM has been sent
        yield data[: len(data) // 2]
        half.set()
        time.sleep(0.5)
        yield data[len(data) // 2:]

    result = {}
    thread = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}/v1/images", content=body(), timeout=60)))
    thread.start()
    assert half.wait(30)
    proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert result["r"].status_code == 200 and not result["r"].json()["cached"]
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in proc.stderr.read()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ois_deploy", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_options(tiny_export, tmp_path):
    assert_one_line_error(run_cli(str(tmp_path / "nowhere"), "--backend", "ort"), "not")
    assert_one_line_error(run_cli(str(tiny_export), "--backend", "nope"), "unknown backend")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli(str(tiny_export), "--port", str(port)), "cannot listen", str(port))
    assert_one_line_error(run_cli(str(tiny_export), "--port", "70000"))
