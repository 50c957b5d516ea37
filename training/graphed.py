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
import warnings
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


@dataclass(eq=False)
class _Graph:
    graph: torch.cuda.CUDAGraph
    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    cond: Mapping[str, torch.Tensor]
    loss: torch.Tensor  # allocated by the capture: steps get copies

    def __del__(self):
        release_graph(self.graph, self.loss)


class GraphedSteps:
    """step(x_t, timestep, target, cond) -> the loss, its gradients in the parameters' .grad."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], dtype: torch.dtype | None, warmup: int = 2):
        self.model, self.params, self.dtype, self.warmup = model, params, dtype, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: collections.Counter = collections.Counter()
        self.failed: set[tuple] = set()
        self.pool = None  # one memory pool for every shape's graph: they are replayed one at a time
        self.peaks: dict[tuple, int] = {}  # each shape's peak memory in its last eager warm-up step
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
        rec.x_t.copy_(x_t)
        rec.timestep.copy_(timestep)
        rec.target.copy_(target)
        rec.graph.replay()
        return rec.loss.clone()  # the capture's own loss tensor stays the graph's (release_graph)

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
            graph, loss, self.pool = capture_graph(step, x_t.device, self.pool, self.peaks.get(key))
        except Exception as e:  # an op the capture cannot take: this shape stays eager
            self.failed.add(key)
            torch._foreach_zero_(self._grads())
            log.warning("training graphs: capture of the step for batch shape %s failed (%s: %s); this shape "
                        "runs eagerly", list(key), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None
        torch._foreach_zero_(self._grads())  # what capture_graph's replay under cudaMallocAsync accumulated
        self.addresses = self._addresses()
        rec = _Graph(graph, *static, cond, loss)
        self.graphs[key] = rec
        log.info("training graphs: step for batch shape %s captured", list(key))
        return rec


def cuda_malloc_async() -> bool:
    """Whether this process's CUDA allocator is cudaMallocAsync (ComfyUI's main.py picks it for
    NVIDIA users)."""
    return torch.cuda.is_available() and torch.cuda.memory.get_allocator_backend() == "cudaMallocAsync"


# Python-level calls that wait for the GPU and that torch's sync debug mode does not see.
_WAITS = ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Stream, "query"),
          (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "query"), (torch.cuda.Event, "elapsed_time"))
_KEPT: list[BaseException] = []  # failed captures' errors whose tensors must never be freed (_keep_if_async)


@contextlib.contextmanager
def waits_refused():
    """Inside a capture, an operation that waits for the GPU raises before it reaches CUDA.

    CUDA answers such an operation on a capturing stream by invalidating the capture, and under
    cudaMallocAsync the tensors allocated in an invalidated capture cannot be freed: the process
    aborts (docs/GPU_TIER.md). Refused in Python first, the capture stays valid and is abandoned
    cleanly (_abandon): torch's own waits (.item(), .cpu(), nonzero, ...) raise through its sync
    debug mode, set to "error" for the capture; torch.cuda.synchronize and the Stream and Event
    waits, which that mode does not see (found on an H200, torch 2.11), through wrappers that raise
    while the calling thread's stream is capturing. A copy from pageable memory torch refuses
    itself. Not covered: waits inside other libraries' C++ code. The sync debug mode is the
    process's: for the capture's duration (tens to hundreds of ms) torch's waits raise in other
    threads too (the host runs one prompt at a time; its server thread does no GPU work)."""
    debug = torch.cuda.is_available()  # (off CUDA only the wrappers, for the CPU tests)
    before = torch.cuda.get_sync_debug_mode() if debug else None
    originals = [(owner, name, getattr(owner, name)) for owner, name in _WAITS]
    for owner, name, fn in originals:
        setattr(owner, name, _refused_while_capturing(fn, name))
    if debug:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if debug:
            torch.cuda.set_sync_debug_mode(before)
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def _refused_while_capturing(fn, name):
    def wrapper(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name}() waits for the GPU: not possible inside a CUDA graph capture")
        return fn(*args, **kwargs)
    return wrapper


def memory_reason(device: torch.device, peak_bytes: int | None) -> str | None:
    """Why a capture of a call that peaked at `peak_bytes` is refused for want of free memory (None:
    it is not). Only under cudaMallocAsync, where a graph's memory comes from CUDA's graph pool,
    outside the pool that torch keeps (so that one is trimmed first when short), and where a graph
    that runs out of it would likely end the process like a failed capture (not tried); torch's
    native allocator captures into its own pool and recovers."""
    if not cuda_malloc_async() or peak_bytes is None:
        return None
    need = 2 * peak_bytes + (512 << 20)
    free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        return (f"{free / 2**30:.2f} GiB free on the GPU, {need / 2**30:.2f} GiB wanted for the capture "
                f"(twice the call's peak of {peak_bytes / 2**30:.2f} GiB, plus 0.5 GiB)")
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Measures the peak memory allocated inside the block, above what was allocated at its start:
    yields a list that holds the bytes afterwards. Only where memory_reason uses it (cudaMallocAsync):
    elsewhere the list stays empty and the allocator's peak statistics are left alone."""
    out: list[int] = []
    if device.type != "cuda" or not cuda_malloc_async():
        yield out
        return
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield out
    out.append(max(0, torch.cuda.max_memory_allocated(device) - start))


def capture_graph(fn, device: torch.device, pool=None, peak_bytes: int | None = None):
    """fn() captured as a CUDA graph on a side stream: (graph, fn's output, pool). `pool` is the
    memory pool's handle to share with earlier graphs (None: a new one, torch.cuda.graph_pool_handle);
    `peak_bytes`, the peak memory of fn called directly (memory_reason).

    As torch.cuda.graph captures, less its torch.cuda.empty_cache() (emptying the allocator's cache
    at every capture made every later allocation of a sampling run a fresh cudaMalloc), with waits
    for the GPU refused before they reach CUDA (waits_refused). Under cudaMallocAsync the graph is
    replayed once before it is returned: freeing the allocations of a graph that never ran aborts
    the process (a run that fails after the capture; found on an H200). A capture that fails raises its
    first error and leaves the process as a capture that never began (_abandon): without that, the
    next capture in the process fails too, or, under cudaMallocAsync, the process aborts."""
    reason = memory_reason(device, peak_bytes)
    if reason:
        raise RuntimeError(f"no CUDA graph: {reason}")
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device=device)
    with torch.cuda.stream(side):
        try:
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        except BaseException:
            undo_failed_capture(graph, device, pool, begun=False)
            raise
        try:
            with waits_refused():
                out = fn()
        except BaseException as e:
            _abandon(graph, device, pool, e)
            raise
        try:
            graph.capture_end()
        except BaseException as e:
            undo_failed_capture(graph, device, pool)
            _keep_if_async(e)
            raise
        if cuda_malloc_async():  # freeing the allocations of a graph that never ran aborts the process
            graph.replay()
    torch.cuda.current_stream(device).wait_stream(side)
    return graph, out, pool


def _abandon(graph: torch.cuda.CUDAGraph, device: torch.device, pool, error: BaseException) -> None:
    """A capture whose function raised, ended without leaving a trace.

    Raised before CUDA saw anything wrong (waits_refused, torch's own refusals), the capture is
    still valid: it ends as a graph of the work recorded so far, which under cudaMallocAsync is
    replayed once before it is dropped (freeing a capture's allocation before its graph has run
    aborts the process; found on an H200), and the memory goes back with the graph. An
    invalidated capture is undone (undo_failed_capture); under cudaMallocAsync the error, whose
    traceback holds the tensors allocated in it, is kept for the life of the process (_keep_if_async)."""
    try:
        graph.capture_end()
    except Exception:  # invalidated by CUDA
        undo_failed_capture(graph, device, pool)
        _keep_if_async(error)
        return
    if cuda_malloc_async():
        graph.replay()
        torch.cuda.current_stream(device).synchronize()
    release_graph(graph)


def release_graph(graph: torch.cuda.CUDAGraph, *captured) -> None:
    """Let go of a graph and of the tensors its capture allocated (`captured`: its outputs, which
    no one else holds) through bound calls, so that cudaMallocAsync's warning "Attempting
    uncaptured free of a captured allocation" (benign: the graph goes with them) arrives as a
    Python warning and is dropped here; a plain `del` frees them in the C++ destructor, which
    prints it to the console each time a run's graphs go. Also at interpreter exit: never raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in captured:
                if isinstance(t, torch.Tensor):
                    with torch.inference_mode(t.is_inference()):
                        t.set_()
            graph.reset()
    except Exception:  # interpreter shutdown (modules torn down): the destructors do the same
        pass


def _keep_if_async(error: BaseException) -> None:
    """Under cudaMallocAsync, keeps `error` (and through its traceback the tensors a failed capture
    allocated) for the life of the process: freeing them would abort it. A leak, logged."""
    if cuda_malloc_async():
        _KEPT.append(error)
        log.error("a CUDA graph capture was invalidated by CUDA (%s); under the cudaMallocAsync allocator its "
                  "tensors are kept, not freed (freeing them would stop ComfyUI). If ComfyUI stops after this, "
                  "start it with --disable-cuda-malloc (torch's own allocator recovers from a failed capture)",
                  str(error).splitlines()[0] if str(error) else type(error).__name__)


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
