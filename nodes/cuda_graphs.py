"""CUDA graphs of recorded model calls: capture once, replay each step on new inputs.

The graphs of a sampling run share one memory pool (GraphPool): they are replayed one after the
other on one stream, never concurrently. A failed capture leaves the process as it was
(training.graphed.capture_graph).
"""
from __future__ import annotations

import logging
import time

import torch

from ..training.graphed import capture_graph, release_graph

log = logging.getLogger(__name__)


class GraphPool:
    """One CUDA-graph memory pool shared by the graphs of a sampling run (replayed one after the
    other on one stream, never concurrently, so their scratch memory can be the same)."""

    def __init__(self):
        self.handle = None


class CudaGraph:
    """fn(x, t) captured once (training.graphed.capture_graph), replayed on new inputs copied into
    its static buffers."""

    def __init__(self, fn, x: torch.Tensor, t: torch.Tensor, pool: GraphPool, peak_bytes: int | None = None):
        self.x, self.t = x.clone(), t.clone()
        t0 = time.perf_counter()
        self.graph, self.out, pool.handle = capture_graph(lambda: fn(self.x, self.t), x.device, pool.handle, peak_bytes)
        self.capture_ms = round(1e3 * (time.perf_counter() - t0), 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out.clone()

    def __del__(self):
        if hasattr(self, "graph"):  # (a failed capture leaves none)
            release_graph(self.graph, self.out)

