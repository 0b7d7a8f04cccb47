"""Does a retraining reproduce a committed checkpoint? Compares two of our checkpoints tensor by
tensor and their loss logs record by record (every field but the wall-clock `seconds`), and
reports both runs' training times from the checkpoints' metadata.

    python benchmarks/retrain_check.py --reference CKPT --reference-log LOG \
        --rerun CKPT2 --rerun-log LOG2 [--json OUT]

Exit code 0 when weights and logs are identical to the bit, 1 when they differ (the report says
where first), 2 on bad input. Float arithmetic can differ in its last bits on another CPU, so
"identical" is a claim about the same kind of machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ois_deploy.errors import UserError, run_script
from ois_deploy.io import write_json
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.model.weights import read_checkpoint

CLOCK_FIELDS = {"seconds"}  # differ between runs by nature


def read_log(path: str) -> list[dict]:
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"loss log not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read loss log {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"loss log {path} is not JSON lines: {e}") from None
    if not all(isinstance(r, dict) for r in records):
        raise UserError(f"loss log {path} is not a training log: its lines must be JSON objects")
    return records


def compare_weights(reference: dict[str, torch.Tensor], rerun: dict[str, torch.Tensor]) -> dict:
    keys = sorted(set(reference) | set(rerun))
    differing = [k for k in keys if k not in reference or k not in rerun
                 or reference[k].shape != rerun[k].shape or not torch.equal(reference[k], rerun[k])]
    comparable = [k for k in differing if k in reference and k in rerun and reference[k].shape == rerun[k].shape]
    return {
        "tensors": len(keys),
        "identical": not differing,
        "differing": differing[:10],
        "max_abs_difference": max((float((reference[k] - rerun[k]).abs().max()) for k in comparable), default=0.0),
    }


def compare_logs(reference: list[dict], rerun: list[dict]) -> dict:
    strip = lambda record: {k: v for k, v in record.items() if k not in CLOCK_FIELDS}  # noqa: E731
    first = next((i for i, (a, b) in enumerate(zip(reference, rerun)) if strip(a) != strip(b)), None)
    if first is None and len(reference) != len(rerun):
        first = min(len(reference), len(rerun))
    return {"records": [len(reference), len(rerun)], "identical": first is None, "first_differing_record": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="the committed checkpoint")
    parser.add_argument("--reference-log", required=True)
    parser.add_argument("--rerun", required=True, help="the checkpoint the retraining wrote")
    parser.add_argument("--rerun-log", required=True)
    parser.add_argument("--json", default="-", help="report file (default: stdout)")
    args = parser.parse_args()

    files = {}
    for name in ("reference", "rerun"):
        loaded = read_checkpoint(getattr(args, name))
        if loaded.format != "ois-safetensors":
            raise UserError(f"{getattr(args, name)} is a {loaded.format} file, not one of our trained checkpoints")
        files[name] = loaded
    weights = compare_weights(files["reference"].state_dict, files["rerun"].state_dict)
    logs = compare_logs(read_log(args.reference_log), read_log(args.rerun_log))
    report = {
        "what": "retraining against a committed checkpoint: weights and loss log compared to the bit",
        "reproduced": weights["identical"] and logs["identical"],
        "weights": weights,
        "log": logs,
        # the training loop's seconds, as `train` recorded them in each checkpoint
        "training_seconds": {name: (loaded.training or {}).get("seconds") for name, loaded in files.items()},
        "files": {k: getattr(args, k) for k in ("reference", "reference_log", "rerun", "rerun_log")},
        "machine": machine_info(),
        "versions": tool_versions(),
        "date": now_utc(),
    }
    write_json(report, args.json)
    if not report["reproduced"]:
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
