"""CUDA graphs of recorded model calls: capture once, replay each step on new inputs.

The graphs of a sampling run share one memory pool (GraphPool): they are replayed one after the
other on one stream, never concurrently. A failed capture leaves the device's random generator
as it was (training.graphed.restore_rng_after_failed_capture).
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..training.graphed import restore_rng_after_failed_capture

log = logging.getLogger(__name__)


class GraphPool:
    """One CUDA-graph memory pool shared by the graphs of a sampling run (replayed one after the
    other on one stream, never concurrently, so their scratch memory can be the same)."""

    def __init__(self):
        self.handle = None


class CudaGraph:
    """fn(x, t) captured once, replayed on new inputs copied into its static buffers.

    Captured as torch.cuda.graph does, less its torch.cuda.empty_cache(): emptying the allocator's
    cache at every capture made every later allocation of the run a fresh cudaMalloc."""

    def __init__(self, fn, x: torch.Tensor, t: torch.Tensor, pool: GraphPool):
        self.x, self.t = x.clone(), t.clone()
        self.graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        torch.cuda.synchronize(x.device)
        stream = torch.cuda.Stream(device=x.device)
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=pool.handle, capture_error_mode="thread_local")
            try:
                t1 = time.perf_counter()
                self.out = fn(self.x, self.t)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.graph.capture_end()  # ends the (invalidated) capture; the first error is the one to see
                restore_rng_after_failed_capture(x.device)
                raise
            t2 = time.perf_counter()
            self.graph.capture_end()
        pool.handle = self.graph.pool()
        self.timing_ms = tuple(round(1e3 * s, 1) for s in (t1 - t0, t2 - t1, time.perf_counter() - t2))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out.clone()

