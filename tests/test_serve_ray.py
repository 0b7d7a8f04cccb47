"""`ois-deploy serve --ray --replicas 2`: the API v1 contract (serve_contract.py, unchanged) against
Ray Serve deployments, each on the local Ray instance its command starts and stops, and a replica
killed with SIGKILL mid-session."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
pytest.importorskip("pycocotools")

from serve_contract import *  # noqa: E402,F401,F403  (the contract tests and their fixtures)
from serve_contract import Server, _sample, as_json, clicker_session, coco_decode, scene, upload  # noqa: E402
from test_serve import assert_one_line_error, cli_args, run_cli, start_serve, stop  # noqa: E402

pytestmark = pytest.mark.slow  # each deployment starts a Ray instance (~30 s on 2 cores)

REPLICA = "SegmentationReplica"  # in the title Ray gives a replica's worker process


@pytest.fixture(scope="session")
def launch(tiny_export):
    procs = []

    def launch(**options) -> Server:
        proc, url = start_serve(tiny_export, "--ray", "--replicas", "2", *cli_args(options), timeout=240)
        procs.append(proc)
        # An image's requests all reach one replica (ImageAffinityRouter), which keeps its prefixes.
        return Server(url, tiny_export, api_key=options.get("api_key"), extra={"proc": proc})

    yield launch
    for proc in procs:
        assert stop(proc) == 0


def replica_pids(root: int) -> list[int]:
    """Live model-replica processes under process `root` (the command, parent of its Ray instance)."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (ValueError, OSError):
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            parents[int(entry.name)] = int(ppid)

    def under(pid: int) -> bool:
        while pid in parents and pid != root:
            pid = parents[pid]
        return pid == root

    return sorted(pid for pid, title in titles.items() if REPLICA in title and pid in parents and under(pid))


def wait_for_replicas(root: int, n: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = replica_pids(root)
        if len(pids) >= n:
            return pids
        time.sleep(0.5)
    raise AssertionError(f"{n} replicas did not come up: {replica_pids(root)}")


def test_replica_killed_mid_session(server, reference):
    """Both replicas that started the session are killed (SIGKILL), one at a time, each while the
    other lives: the session goes on, every mask identical to Predictor's, the image never posted
    again (a replica that did not hold it fetched its bytes from the store)."""
    data, gt = scene(12)
    clicks = clicker_session(reference, data, gt, 8)
    want = reference(data, clicks)
    root = server.extra["proc"].pid
    originals = wait_for_replicas(root, 2)
    assert len(originals) == 2
    with server.client() as client:
        image_id = upload(client, data)["image_id"]
        for k in range(1, len(clicks) + 1):
            if k in (3, 6):
                victim = originals[0 if k == 3 else 1]
                os.kill(victim, signal.SIGKILL)
                if k == 3:  # the second kill waits for the first one's replacement
                    wait_for_replicas(root, 2)
            for _ in range(10):  # a retry, should the deployment answer 503 while it recovers
                r = client.post(f"/v1/images/{image_id}/masks", json={"clicks": as_json(clicks[:k])})
                if r.status_code != 503:
                    break
                time.sleep(1)
            assert r.status_code == 200, r.text
            assert np.array_equal(coco_decode(r.json()["mask"]), want[k - 1]), f"click {k}"
        metrics = client.get("/metrics").text
    assert not set(originals) & set(replica_pids(root))
    assert _sample(metrics, "ois_affinity_misses_total") >= 1  # a replacement re-encoded from the store
    assert _sample(metrics, "ois_affinity_hits_total") >= 1


def test_ray_bad_options(tiny_export):
    assert_one_line_error(run_cli(str(tiny_export), "--ray", "--backend", "nope"), "unknown backend")
    assert_one_line_error(run_cli(str(tiny_export), "--ray", "--replicas", "64"), "64 CPUs")


def test_on_a_running_cluster(tiny_export):
    """--ray-address: the command deploys on a Ray instance it did not start (here this test's),
    and on SIGTERM removes its application and leaves the instance running."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        address = ray.get_runtime_context().gcs_address
        proc, url = start_serve(tiny_export, "--ray", "--ray-address", address, "--replicas", "2", timeout=240)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                data, _ = scene(14)
                image_id = upload(client, data)["image_id"]
                r = client.post(f"/v1/images/{image_id}/masks", json={"clicks": [{"x": 50, "y": 40}]})
                assert r.status_code == 200, r.text
        finally:
            assert stop(proc) == 0
        assert "ois-deploy" not in serve.status().applications
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2
    finally:
        serve.shutdown()
        ray.shutdown()
