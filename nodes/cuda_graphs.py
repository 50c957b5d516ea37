"""CUDA graphs of recorded model calls: capture once, replay each step on new inputs.

The graphs of a sampling run share one memory pool (GraphPool): they are replayed one after the
other on one stream, never concurrently. A failed capture leaves the device's random generator
as it was (_restore_rng).
"""
from __future__ import annotations

import contextlib
import logging
import time

import torch

log = logging.getLogger(__name__)


class GraphPool:
    """One CUDA-graph memory pool shared by the graphs of a sampling run (replayed one after the
    other on one stream, never concurrently, so their scratch memory can be the same)."""

    def __init__(self):
        self.handle = None


def _restore_rng(device: torch.device) -> None:
    """Undo what a failed capture leaves behind in the device's default random generator.

    When cudaStreamEndCapture fails, torch skips the generator's capture epilogue, and the
    generator stays in capture mode: the next random op on the device outside a capture (an SDE
    sampler's noise, inductor's autotuning) raises "Offset increment outside graph capture
    encountered unexpectedly". A fresh generator state at the same seed and offset ends that."""
    try:
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        fresh = torch.Generator(device=device)
        fresh.manual_seed(gen.initial_seed())
        with contextlib.suppress(RuntimeError):  # the offset may be unreadable in that state: start at 0
            fresh.set_offset(gen.get_offset())
        gen.graphsafe_set_state(fresh.graphsafe_get_state())
    except Exception as e:  # an older torch without graph-safe generator states: nothing more to do
        log.debug("random generator state not restored after a failed capture (%s: %s)", type(e).__name__, e)


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
                _restore_rng(x.device)
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

