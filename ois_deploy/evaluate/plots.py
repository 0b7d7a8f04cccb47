"""Plots: the mIoU-vs-clicks curve of `eval --plot` and the latency chart of `bench --report`.
matplotlib is imported only here (the `plot` extra)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..io import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_curve(path: str | Path, miou: list[float], label: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(miou) + 1), miou, marker="o", markersize=3, label=label)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def report_chart(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    latest = {(r["preset"], r["backend"], r["precision"], r["device"]): r for r in records}
    labels = [f"{p}\n{b} {q}" for p, b, q, _ in latest]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [r["decoder_ms"]["p50"] for r in latest.values()], 0.4, label="decoder p50 (ms)")
    ax.bar(x + 0.2, [r["spc_ms"] for r in latest.values()], 0.4, label="SPC (ms)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.legend()
    ax.set_title("ois-deploy latency")
    fig.tight_layout()
    _save(fig, path)
