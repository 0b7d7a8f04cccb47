"""Seconds per training step of the working tree against another git revision, side by side.

The two trees train in turn (current, base, current, base, ...), each run a fresh process
training `--steps` steps of the documented ois-tiny recipe from step 0, so that this shared
machine's speed of the day, which moves a whole run by 20-40%, cancels in the ratio. Quote the
ratio; the absolute times hold for this machine on this day only.

    python benchmarks/train_speed.py --base REV [--steps 25] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ois_deploy.errors import UserError, run_script
from ois_deploy.io import write_json
from ois_deploy.provenance import machine_info, now_utc, tool_versions

REPO = Path(__file__).resolve().parents[1]

# Run inside each tree: train, report the training loop's own seconds and which code ran.
TIMED_RUN = """
import json, sys, tempfile, os
import ois_deploy.train.loop as t
with tempfile.TemporaryDirectory() as folder:
    summary = t.train("ois-tiny", t.TrainSettings(steps=int(sys.argv[1]), seed=0),
                      os.path.join(folder, "w.safetensors"), os.path.join(folder, "log.jsonl"))
print(json.dumps({"seconds": summary["seconds"], "module": t.__file__}))
"""


def last_line(text: str) -> str:
    """The line a failed subprocess ends its stderr with (the one-line error's reason)."""
    return (text.strip().splitlines() or ["no message"])[-1]


def git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if result.returncode:
        raise UserError(f"git {args[0]} failed: {last_line(result.stderr)}")
    return result.stdout.strip()


def timed_run(tree: Path, steps: int) -> float:
    # `python -c` puts the working folder first on sys.path, before PYTHONPATH: run in the tree
    env = dict(os.environ, PYTHONPATH=str(tree))
    result = subprocess.run([sys.executable, "-c", TIMED_RUN, str(steps)], capture_output=True, text=True, env=env, cwd=tree)
    if result.returncode:
        raise UserError(f"training in {tree} failed: {last_line(result.stderr)}")
    run = json.loads(result.stdout.strip().splitlines()[-1])
    if not Path(run["module"]).resolve().is_relative_to(tree.resolve()):
        raise UserError(f"the run in {tree} imported {run['module']} instead of its own code")
    return run["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--steps", type=int, default=25, help="training steps per run (from step 0)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating")
    parser.add_argument("--json", default="-", help="output JSON path, - for stdout")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        raise UserError("--steps and --rounds must be at least 1")
    try:
        base_sha = git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
    except UserError:
        raise UserError(f"not a commit of this repository: {args.base}") from None
    head_sha, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    seconds: dict[str, list[float]] = {"current": [], "base": []}
    with tempfile.TemporaryDirectory() as scratch:
        base_tree = Path(scratch) / "base"
        git("worktree", "add", "--detach", str(base_tree), base_sha)
        try:
            for round_ in range(args.rounds):
                for name, tree in (("current", REPO), ("base", base_tree)):
                    seconds[name].append(timed_run(tree, args.steps))
                    print(f"round {round_ + 1}/{args.rounds} {name}: {seconds[name][-1] / args.steps:.3f} s/step", file=sys.stderr)
        finally:
            git("worktree", "remove", "--force", str(base_tree))
    per_step = {name: round(sum(runs) / len(runs) / args.steps, 4) for name, runs in seconds.items()}
    write_json(
        {
            "what": f"seconds per ois-tiny training step, steps 0-{args.steps - 1}, trees run in turn",
            "current": {"commit": head_sha, "uncommitted_changes": dirty, "seconds_per_step": per_step["current"]},
            "base": {"commit": base_sha, "seconds_per_step": per_step["base"]},
            "ratio_current_to_base": round(per_step["current"] / per_step["base"], 3),
            "runs_seconds": seconds,
            "steps": args.steps,
            "machine": machine_info(),
            "versions": tool_versions(),
            "date": now_utc(),
        },
        args.json,
    )


if __name__ == "__main__":
    run_script(main)
