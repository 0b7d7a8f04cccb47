"""`serve --ray` with 1 and with 2 replicas, side by side in one run, on the same sessions.

The client side is load_serve.py's (sessions of generated scenes, the evaluation's clicker, C
client threads, masks hashed). For each replica count R this starts `ois-deploy serve MODEL --ray
--replicas R --threads 1 --cpus-per-replica 1` (a local Ray instance; one ONNX Runtime thread and
one model call at a time per replica, so that 2 replicas have twice the cores of one), then runs
C = 1 and 4 clients. Reported per run: clicks per second, per-click latency (client side), the
affinity hit rate (the replicas' counters in /metrics over the run), errors, and whether every
mask is identical to the 1-replica run's.

    .venv/bin/python benchmarks/load_serve_ray.py --model artifacts/ois-tiny \
        --out benchmarks/results/serve_ray_ois-tiny.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load_serve as ls  # noqa: E402

from ois_deploy.errors import run_script  # noqa: E402
from ois_deploy.io import write_json  # noqa: E402
from ois_deploy.provenance import cpu_flags, machine_info, now_utc, tool_versions  # noqa: E402


def delta(after: dict, before: dict) -> dict:
    return {k: round(v - before.get(k, 0), 6) for k, v in after.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/ois-tiny", help="Export folder.")
    ap.add_argument("--replicas", default="1,2", help="Comma-separated replica counts.")
    ap.add_argument("--clients", default="1,4", help="Comma-separated client counts.")
    ap.add_argument("--sessions", type=int, default=16, help="Sessions per run (distinct scenes).")
    ap.add_argument("--clicks", type=int, default=20, help="Clicks per session.")
    ap.add_argument("--out", default=str(ls.RESULTS / f"serve_ray_{now_utc()[:10]}.json"))
    args = ap.parse_args()
    replica_counts = [int(r) for r in args.replicas.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    deadline = time.monotonic() + 1800
    load_before = os.getloadavg()
    runs, records = [], {}
    for r in replica_counts:
        server = ls.ServerProcess(args.model, ["--ray", "--replicas", str(r), "--threads", "1", "--cpus-per-replica", "1"])
        try:
            ls.run_clients(ls.make_sessions(2, seed=9), 2, ls.http_work(server.url, 3, deadline))  # warm-up
            for c in clients:
                before = ls.scrape(server.url)
                sessions = ls.make_sessions(args.sessions, seed=c)  # new images for each client count
                record, seconds = ls.run_clients(sessions, c, ls.http_work(server.url, args.clicks, deadline))
                metrics = delta(ls.scrape(server.url), before)
                run = ls.summarise(f"ray-{r}-http-{c}", "http", c, record, seconds, replicas=r, server_metrics=metrics)
                hits, misses = metrics.get("ois_affinity_hits_total", 0), metrics.get("ois_affinity_misses_total", 0)
                run["affinity_hit_rate"] = round(hits / (hits + misses), 4) if hits + misses else None
                if (replica_counts[0], c) in records:
                    run["masks_vs_first"] = ls.same_masks(record, records[(replica_counts[0], c)])
                records[(r, c)] = record
                runs.append(run)
                print(f"{'':>14}  affinity hit rate {run['affinity_hit_rate']}", flush=True)
        finally:
            server.stop()
    by = {(run["replicas"], run["clients"]): run for run in runs}
    summary = {"errors": sum(run["errors"] for run in runs)}
    for c in clients:
        for r in replica_counts:
            run = by[(r, c)]
            summary[f"{r}_replicas_{c}_clients"] = {"clicks_per_s": run["clicks_per_s"], "click_p50_ms": run["click_ms"]["p50"],
                                                    "click_p99_ms": run["click_ms"]["p99"],
                                                    "affinity_hit_rate": run["affinity_hit_rate"]}
        if len(replica_counts) > 1:
            first, last = by[(replica_counts[0], c)], by[(replica_counts[-1], c)]
            summary[f"clicks_per_s_{replica_counts[-1]}_vs_{replica_counts[0]}_replicas_{c}_clients"] = round(
                last["clicks_per_s"] / first["clicks_per_s"], 2)
    versions = tool_versions()
    result = {"what": "serve --ray, 1 vs 2 replicas (one ONNX Runtime thread, one CPU each), the same sessions",
              "command": " ".join(["python", "benchmarks/load_serve_ray.py", *sys.argv[1:]]),
              "date": now_utc(), "machine": {**machine_info(), "cpu_flags": cpu_flags()}, "versions": versions,
              "load_average": {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]},
              "model": ls.model_identity(args.model), "clicks_per_session": args.clicks, "sessions": args.sessions,
              "summary": summary, "runs": runs}
    write_json(result, args.out)
    print(f"summary: {summary}\nwrote {args.out}")


if __name__ == "__main__":
    run_script(main)
