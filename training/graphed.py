"""A training step's forward and backward as CUDA graphs (TrainConfig.cuda_graph; the node and
the headless trainer turn it on for LoRA mode where the run allows it, for full mode on request:
nodes/training/run.py with_cuda_graphs).

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
leaves that shape eager for the run, with a warning; a Cancel inside it stops the run. Weights
that moved (the host reloaded the model, e.g. around a preview) drop the graphs, and so does the
host when it needs their memory (cudagraph.OWNER, which holds them for the run only): they are
captured again after the warm-up. close() lets them go at the end of the run.
"""
from __future__ import annotations

import collections
import logging
from typing import Mapping

import torch
from torch import nn

from .noise import predicted_loss

try:  # inside the pack (ComfyUI imports it as a package)
    from ..cudagraph import OWNER, Graph, GraphOwner, cuda_malloc_async, is_interrupt, peak_memory, weight_addresses
except ImportError:  # `training` imported as a top-level package (tools/, tests/: the repo root on sys.path)
    from cudagraph import OWNER, Graph, GraphOwner, cuda_malloc_async, is_interrupt, peak_memory, weight_addresses

log = logging.getLogger(__name__)


class GraphedSteps:
    """step(x_t, timestep, target, cond) -> the loss, its gradients in the parameters' .grad."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], dtype: torch.dtype | None, warmup: int = 2,
                 owner: GraphOwner | None = None):
        self.model, self.params, self.dtype, self.warmup = model, params, dtype, warmup
        self.owner = owner or OWNER
        self.graphs: dict[tuple, Graph] = {}  # batch shape -> its graph (held by the owner for this run)
        self.seen: collections.Counter = collections.Counter()
        self.failed: set[tuple] = set()
        self.peaks: dict[tuple, int] = {}  # each shape's peak memory in its last eager warm-up step
        self.addresses: list[int] | None = None

    def __call__(self, x_t: torch.Tensor, timestep: torch.Tensor, target: torch.Tensor,
                 cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        grads = self._grads()
        torch._foreach_zero_(grads)
        if self.graphs and self._addresses() != self.addresses:
            log.info("training graphs: the model's weights moved; capturing again after %d eager steps", self.warmup)
            self.close()
        key = tuple(x_t.shape)
        rec = self.graphs.get(key)
        if rec is not None and not rec.alive:  # the host took the memory back: capture again after the warm-up
            del self.graphs[key]
            self.seen[key], rec = 0, None
        if rec is None or rec.holds is not cond:
            self.seen[key] += 1
            if key in self.failed:
                return self._eager(x_t, timestep, target, cond)
            if self.seen[key] <= self.warmup:
                with peak_memory(x_t.device) as peak:
                    loss = self._eager(x_t, timestep, target, cond)
                self.peaks[key] = peak[0] if peak else None
                return loss
            rec = self._capture(key, x_t, timestep, target, cond)
            if rec is None:
                return self._eager(x_t, timestep, target, cond)
        return rec(x_t, timestep, target)

    def close(self) -> None:
        """Lets go of this run's graphs (the owner keeps no training graph past its run)."""
        self.owner.drop([("training", id(self), key) for key in self.graphs], "the training run's graphs")
        self.graphs.clear()
        self.seen.clear()

    def _grads(self) -> list[torch.Tensor]:
        """The gradient tensors, made once (zeros) so that eager steps and graphs accumulate into
        the same memory."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    def _addresses(self) -> list[int]:
        return weight_addresses(self.model)

    def _eager(self, x_t, timestep, target, cond) -> torch.Tensor:
        loss = predicted_loss(self.model, x_t, timestep, target, cond, self.dtype)
        loss.backward()
        return loss.detach()

    def _capture(self, key, x_t, timestep, target, cond) -> Graph | None:
        def step(x, t, y):
            loss = predicted_loss(self.model, x, t, y, cond, self.dtype, cache=False)
            loss.backward()
            return loss.detach()

        try:
            rec = self.owner.capture(("training", id(self), key), step, [x_t, timestep, target], x_t.device,
                                     self.peaks.get(key), holds=cond, model=self.model, keep=False)
        except Exception as e:  # an op the capture cannot take: this shape stays eager
            torch._foreach_zero_(self._grads())
            if is_interrupt(e):  # the host's Cancel, raised by a layer inside the capture
                raise
            self.failed.add(key)
            log.warning("training graphs: capture of the step for batch shape %s failed (%s: %s); this shape "
                        "runs eagerly", list(key), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None
        torch._foreach_zero_(self._grads())  # what the capture's first replay under cudaMallocAsync accumulated
        self.addresses = self._addresses()
        self.graphs[key] = rec
        log.info("training graphs: step for batch shape %s captured", list(key))
        return rec


__all__ = ["GraphedSteps", "cuda_malloc_async"]
