"""A training step's forward and backward as CUDA graphs (TrainConfig.cuda_graph, opt-in).

Why: a LoRA step is bound by the host's launches, not by the GPU (docs/BENCHMARKS.md: SD1.5 at
batch 8 on an H200, 94 ms of kernels in a 249 ms step; each adapter adds small ops to a forward
and a backward of about a thousand layers). A CUDA graph replays the recorded kernels with one
launch (Nvidia's "whole-network capture", torch.cuda.graph's recipe).

What is recorded, once per batch shape (bucket): the model's forward under autocast, the loss
and its backward, on static inputs (x_t, the timestep, the target; the bucket's conditioning),
accumulating into gradient tensors made once and kept as the parameters' `.grad` (zeroed before
each step). What stays as it was: the noising (it reads the schedule on the CPU), reading the
loss (one synchronisation per step), the optimizer step, the EMA.

The first `warmup` steps of each shape run eagerly (the same computation; cuDNN's autotuning
and the allocator settle first, as the recipe asks), then the capture. A capture that fails
leaves that shape eager for the run, with a warning. Weights that moved (the host reloaded the
model, e.g. around a preview) drop the graphs: they are captured again after the warm-up.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .noise import denoising_loss

log = logging.getLogger(__name__)


def predicted_loss(model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, target: torch.Tensor,
                   cond: Mapping[str, torch.Tensor], dtype: torch.dtype | None, cache: bool = True) -> torch.Tensor:
    """The model's prediction under autocast (dtype None: none) and its loss to the target. `cache`:
    autocast's weight-cast cache, which a CUDA graph capture must not use."""
    with torch.autocast(x_t.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=cache):
        prediction = model(x_t, timestep, **cond)
    if prediction.shape != x_t.shape:
        raise ValueError(f"the UNet returned {list(prediction.shape)} for input {list(x_t.shape)}; "
                         f"expected the raw model output, shaped like x")
    return denoising_loss(prediction, target)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    cond: Mapping[str, torch.Tensor]
    loss: torch.Tensor


class GraphedSteps:
    """step(x_t, timestep, target, cond) -> the loss, its gradients in the parameters' .grad."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], dtype: torch.dtype | None, warmup: int = 2):
        self.model, self.params, self.dtype, self.warmup = model, params, dtype, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: collections.Counter = collections.Counter()
        self.failed: set[tuple] = set()
        self.pool = None  # one memory pool for every shape's graph: they are replayed one at a time
        self.addresses: list[int] | None = None

    def __call__(self, x_t: torch.Tensor, timestep: torch.Tensor, target: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        grads = self._grads()
        torch._foreach_zero_(grads)
        if self.graphs and self._addresses() != self.addresses:
            log.info("training graphs: the model's weights moved; capturing again after %d eager steps", self.warmup)
            self.graphs.clear()
            self.seen.clear()
        key = tuple(x_t.shape)
        rec = self.graphs.get(key)
        if rec is None or rec.cond is not cond:
            self.seen[key] += 1
            if key in self.failed or self.seen[key] <= self.warmup:
                return self._eager(x_t, timestep, target, cond)
            rec = self._capture(key, x_t, timestep, target, cond)
            if rec is None:
                return self._eager(x_t, timestep, target, cond)
        rec.x_t.copy_(x_t)
        rec.timestep.copy_(timestep)
        rec.target.copy_(target)
        rec.graph.replay()
        return rec.loss

    def _grads(self) -> list[torch.Tensor]:
        """The gradient tensors, made once (zeros) so that eager steps and graphs accumulate into
        the same memory."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def _addresses(self) -> list[int]:
        return [t.data_ptr() for t in self.model.parameters()] + [t.data_ptr() for t in self.model.buffers()]

    def _eager(self, x_t, timestep, target, cond) -> torch.Tensor:
        loss = predicted_loss(self.model, x_t, timestep, target, cond, self.dtype)
        loss.backward()
        return loss.detach()

    def _capture(self, key, x_t, timestep, target, cond) -> _Graph | None:
        static = [x_t.clone(), timestep.clone(), target.clone()]
        def step():
            loss = predicted_loss(self.model, *static, cond, self.dtype, cache=False)
            loss.backward()
            return loss.detach()

        try:
            graph, loss, self.pool = capture_graph(step, x_t.device, self.pool)
        except Exception as e:  # an op the capture cannot take: this shape stays eager
            self.failed.add(key)
            torch._foreach_zero_(self._grads())
            log.warning("training graphs: capture of the step for batch shape %s failed (%s: %s); this shape "
                        "runs eagerly", list(key), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None
        self.addresses = self._addresses()
        rec = _Graph(graph, *static, cond, loss)
        self.graphs[key] = rec
        log.info("training graphs: step for batch shape %s captured", list(key))
        return rec


def cuda_malloc_async() -> bool:
    """Whether this process's CUDA allocator is cudaMallocAsync (ComfyUI's main.py picks it for
    NVIDIA users)."""
    return torch.cuda.is_available() and torch.cuda.memory.get_allocator_backend() == "cudaMallocAsync"


def allocator_reason() -> str | None:
    """Why no CUDA graph is made in this process (None: they may be). Under cudaMallocAsync, the
    allocator ComfyUI's main.py picks for NVIDIA users, a capture that fails ends the process:
    tensors allocated inside it cannot be freed (cudaFreeAsync fails in their destructor, which
    aborts). Found on an H200 with torch 2.11; torch's native allocator recovers
    (undo_failed_capture)."""
    if cuda_malloc_async():
        return ("CUDA allocator cudaMallocAsync, where a failed capture ends the process; "
                "ComfyUI's --disable-cuda-malloc allows CUDA graphs")
    return None


def capture_graph(fn, device: torch.device, pool=None):
    """fn() captured as a CUDA graph on a side stream: (graph, fn's output, pool). `pool` is the
    memory pool's handle to share with earlier graphs (None: a new one, torch.cuda.graph_pool_handle).

    As torch.cuda.graph captures, less its torch.cuda.empty_cache() (emptying the allocator's cache
    at every capture made every later allocation of a sampling run a fresh cudaMalloc). A capture
    that fails raises its first error and leaves the process as a capture that never began
    (undo_failed_capture): without that, the next capture in the process fails too. Refused, before
    anything is captured, where allocator_reason() names a reason."""
    reason = allocator_reason()
    if reason:
        raise RuntimeError(f"no CUDA graph: {reason}")
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    with torch.cuda.stream(torch.cuda.Stream(device=device)):
        try:
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        except BaseException:
            undo_failed_capture(graph, device, pool, begun=False)
            raise
        try:
            out = fn()
        except BaseException:
            with contextlib.suppress(Exception):
                graph.capture_end()  # ends the (invalidated) capture; the first error is the one to see
            undo_failed_capture(graph, device, pool)
            raise
        try:
            graph.capture_end()
        except BaseException:
            undo_failed_capture(graph, device, pool)
            raise
    return graph, out, pool


def undo_failed_capture(graph: torch.cuda.CUDAGraph, device: torch.device, pool, begun: bool = True) -> None:
    """What a failed capture leaves behind, undone: the allocator's capture state, the capture's
    hold on its memory pool, the random generator's capture mode.

    torch's capture_end stops at the failed cudaStreamEndCapture, before it tells the allocator
    that the capture ended. Under cudaMallocAsync (ComfyUI's default allocator for NVIDIA users)
    the allocator then believes a capture is still under way, and every later capture in the
    process fails ("capture_free_streams.empty() INTERNAL ASSERT FAILED"); under torch's native
    allocator the failed graph never releases its pool, whose memory stays reserved for the life
    of the process. A graph that did end (its pool readable) releases the pool itself."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ended_recording = False
    with contextlib.suppress(Exception):  # raises when the capture never began or already told the allocator
        torch._C._cuda_endAllocateToPool(index, pool)
        ended_recording = True
    try:
        graph.pool()
        graph_ended = True
    except Exception:
        graph_ended = False
    if not graph_ended and (begun or ended_recording):
        with contextlib.suppress(Exception):
            torch._C._cuda_releasePool(index, pool)
    _restore_rng(device, index)


def _restore_rng(device: torch.device, index: int) -> None:
    """Undo what a failed capture leaves behind in the device's default random generator.

    When cudaStreamEndCapture fails, torch skips the generator's capture epilogue, and the
    generator stays in capture mode: the next random op on the device outside a capture (an SDE
    sampler's noise, inductor's autotuning) raises "Offset increment outside graph capture
    encountered unexpectedly". A fresh generator state at the same seed and offset ends that."""
    try:
        gen = torch.cuda.default_generators[index]
        fresh = torch.Generator(device=device)
        fresh.manual_seed(gen.initial_seed())
        with contextlib.suppress(RuntimeError):  # the offset may be unreadable in that state: start at 0
            fresh.set_offset(gen.get_offset())
        gen.graphsafe_set_state(fresh.graphsafe_get_state())
    except Exception as e:  # an older torch without graph-safe generator states: nothing more to do
        log.debug("random generator state not restored after a failed capture (%s: %s)", type(e).__name__, e)
