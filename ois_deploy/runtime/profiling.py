"""Per-node profiles of decoder calls (`ois-deploy bench --profile`): each runtime's own
counters (OpenVINO's PERF_COUNT, ONNX Runtime's profiler), summed the same way: by node type,
and the nodes that took longest, in ms per call."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np

TOP_NODES = 20
# Node types that only move data (change a tensor's layout or precision, or copy it), listed node
# by node in a profile: OpenVINO's Reorder, Transpose, Convert and Tile; ONNX Runtime's NCHWc
# reorders, Transpose and Cast.
CONVERSION_TYPES = ("Reorder", "Transpose", "Convert", "Tile", "ReorderInput", "ReorderOutput", "Cast")


class NodeTime(NamedTuple):
    """One executed node of one call, as the runtime reports it."""

    name: str
    type: str  # the runtime's node type (OpenVINO: Convolution, Reorder, ...; ONNX Runtime: the op)
    kernel: str  # the implementation the runtime chose (OpenVINO's exec type; ONNX Runtime: its provider)
    ms: float


def summarise(events: list[NodeTime], calls: int, wall_ms: list[float], runtime: str) -> dict:
    """ms per call by node type (largest first), every layout or precision conversion, and the
    TOP_NODES slowest nodes; nodes_ms is the sum of every node, call_ms the median wall time of a
    call (nodes_ms may exceed it a little where nodes run in parallel, and falls short by the
    runtime's own overhead)."""
    by_type, by_node, count = defaultdict(float), defaultdict(float), defaultdict(set)
    for e in events:
        by_type[e.type] += e.ms
        by_node[(e.name, e.type, e.kernel)] += e.ms
        count[e.type].add(e.name)
    total = sum(by_type.values())
    nodes = [{"name": n, "type": t, "kernel": k, "ms": ms / calls}
             for (n, t, k), ms in sorted(by_node.items(), key=lambda kv: -kv[1])]
    return {
        "runtime": runtime,
        "calls": calls,
        "call_ms": float(np.median(wall_ms)),
        "nodes_ms": total / calls,
        "by_type": [{"type": t, "ms": ms / calls, "share": ms / total if total else 0.0, "nodes": len(count[t])}
                    for t, ms in sorted(by_type.items(), key=lambda kv: -kv[1])],
        "conversions": [node for node in nodes if node["type"] in CONVERSION_TYPES],
        "top_nodes": nodes[:TOP_NODES],
    }
