"""Capturing a CUDA graph without ever stopping the process, and letting it go quietly.

The rules, each learnt on an H100/H200 under both of torch's allocators (docs/GPU_TIER.md):

- A wait for the GPU inside a capture makes CUDA invalidate it; under cudaMallocAsync the
  tensors allocated in an invalidated capture cannot be freed (freeing them aborts the process).
  So waits are refused in Python before CUDA sees them (waits_refused), and a capture whose
  function raised ends as a valid partial graph that is dropped cleanly (_abandon).
- Under cudaMallocAsync a graph must run once before anything it allocated is freed: every new
  graph is replayed once, guarded (_first_replay): a launch that fails for want of memory is
  retried after the pools are trimmed, and what cannot be freed is kept (keep), never freed.
- What is kept is only the tensors that must stay alive, counted in the log; not the tracebacks
  (which held the recorded call, its model and conditioning).
- An interrupt (ComfyUI's Cancel, Ctrl-C) is never taken for a failed capture: callers ask
  is_interrupt() and re-raise.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from .memory import trim_graph_memory

log = logging.getLogger(__name__)

_INTERRUPTS: list[type[BaseException]] = [KeyboardInterrupt, SystemExit]


def register_interrupt(kind: type[BaseException]) -> None:
    """An exception type that stops a run (the host's Cancel): never handled as a failed capture."""
    if kind not in _INTERRUPTS:
        _INTERRUPTS.append(kind)


def is_interrupt(error: BaseException) -> bool:
    """True if `error` is a Cancel or Ctrl-C, which must propagate from every capture and replay."""
    return isinstance(error, tuple(_INTERRUPTS))


def cuda_malloc_async() -> bool:
    """Whether this process's CUDA allocator is cudaMallocAsync (ComfyUI's main.py picks it for
    NVIDIA users)."""
    return torch.cuda.is_available() and torch.cuda.memory.get_allocator_backend() == "cudaMallocAsync"


# Python-level calls that wait for the GPU and that torch's sync debug mode does not see.
_WAITS = ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Stream, "query"),
          (torch.cuda.Event, "synchronize"), (torch.cuda.Event, "query"), (torch.cuda.Event, "elapsed_time"))
_KEPT: list = []  # what a failed capture or first replay left that must never be freed (keep)
_KEPT_BYTES = [0]


@contextlib.contextmanager
def waits_refused():
    """Inside a capture, an operation that waits for the GPU raises before it reaches CUDA.

    torch's own waits (.item(), .cpu(), nonzero, ...) raise through its sync debug mode, set to
    "error" for the capture; torch.cuda.synchronize and the Stream and Event waits, which that mode
    does not see (found on an H200, torch 2.11), through wrappers that raise while the calling
    thread's stream is capturing. A copy from pageable memory torch refuses itself. Not covered:
    waits inside other libraries' C++ code (then CUDA invalidates the capture: _abandon). The sync
    debug mode is the process's: during the capture (tens to hundreds of ms) torch's waits raise in
    other threads too; ComfyUI runs one prompt at a time and its server thread does no GPU work."""
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
    outside the pool that torch keeps (so that one is trimmed first when short); torch's native
    allocator captures into its own pool and recovers."""
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
    for the GPU refused before they reach CUDA (waits_refused), and under cudaMallocAsync the graph
    run once before it is returned (_first_replay). A capture that fails raises and leaves the
    process as a capture that never began (_abandon); an interrupt raised inside fn comes out as
    itself."""
    reason = memory_reason(device, peak_bytes)
    if reason:
        raise RuntimeError(f"no CUDA graph: {reason}")
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    side = capture_stream(device)
    invalidated = None
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
            invalidated = _abandon(graph, device, pool, e)
            if invalidated is None:
                raise
    if invalidated is not None:  # raised here, outside the handler: the failed frames are let go
        raise invalidated
    with torch.cuda.stream(side):
        try:
            graph.capture_end()
        except BaseException as e:
            undo_failed_capture(graph, device, pool)
            invalidated = _invalidated(e, [out])
        if invalidated is None and cuda_malloc_async():
            _first_replay(graph, device, out)
    if invalidated is not None:
        raise invalidated
    torch.cuda.current_stream(device).wait_stream(side)
    return graph, out, pool


_STREAMS: dict = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream every capture on `device` uses (the recording call warms it up). cuBLAS
    keeps a workspace per stream, made at the stream's first matmul; made inside a capture, it is
    graph memory that stays for the process's life. With a new stream per capture, CUDA's graph
    memory in use grew in steps up to 1 GiB on an H100 (32 streams in torch's pool x 32 MiB; not
    yet measured again with one stream). One stream: one workspace, let go with the last graph
    (clear_workspaces)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=torch.device("cuda", index))
    return _STREAMS[index]


def clear_workspaces() -> None:
    """Frees cuBLAS's cached workspaces (made again at the next matmul). Only once no graph is
    left: a graph captured on a stream reads that stream's workspace."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_initialized():
        with warnings.catch_warnings():  # (a workspace made inside a capture: "uncaptured free")
            warnings.simplefilter("ignore")
            clear()


def _first_replay(graph: torch.cuda.CUDAGraph, device: torch.device, *captured) -> None:
    """A new graph's first run under cudaMallocAsync, where freeing the allocations of a graph that
    never ran aborts the process. A launch that fails (out of memory when CUDA maps the graph's
    memory) is tried again once torch's pool and CUDA's graph memory are trimmed; if that fails
    too, the graph and its outputs are kept (keep) and the error raised: the caller runs without
    the graph, the process goes on."""
    try:
        graph.replay()
        return
    except Exception as e:
        error = e
    log.warning("a new CUDA graph's first run failed (%s); trimming memory and trying once more", _first_line(error))
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
        trim_graph_memory(device)
    try:
        graph.replay()
        return
    except Exception:
        keep("a new CUDA graph that could not run", [graph, *captured])
    raise RuntimeError(f"the new CUDA graph could not run: {_first_line(error)}")


def _abandon(graph: torch.cuda.CUDAGraph, device: torch.device, pool, error: BaseException) -> BaseException | None:
    """A capture whose function raised, ended without leaving a trace; returns None, or, if CUDA
    had invalidated the capture, the error to raise instead of `error` (without its traceback).

    Raised before CUDA saw anything wrong (waits_refused, torch's own refusals, the host's Cancel),
    the capture is still valid: it ends as a graph of the work recorded so far, which under
    cudaMallocAsync runs once (_first_replay) before it is dropped, and the memory goes back with
    the graph. An invalidated capture is undone (undo_failed_capture) and its tensors kept
    (_invalidated)."""
    try:
        graph.capture_end()
    except Exception:  # invalidated by CUDA
        undo_failed_capture(graph, device, pool)
        return _invalidated(error, _frame_tensors(error))
    if cuda_malloc_async():
        try:
            _first_replay(graph, device, *_frame_tensors(error))
        except RuntimeError:  # kept: nothing more to let go
            return None
        torch.cuda.current_stream(device).synchronize()
    release_graph(graph)
    return None


def _invalidated(error: BaseException, tensors: list) -> RuntimeError:
    """The error to raise for a capture CUDA invalidated. Under cudaMallocAsync the tensors
    allocated in it cannot be freed: they are kept (keep), and the error raised has no traceback
    into the capture, so nothing else of the failed call (its model, its conditioning) stays."""
    message = _first_line(error)
    if cuda_malloc_async():
        keep(f"an invalidated CUDA graph capture ({message})", tensors)
        log.error("If ComfyUI stops after this, start it with --disable-cuda-malloc "
                  "(torch's own allocator recovers from a failed capture)")
    return RuntimeError(f"CUDA graph capture invalidated by CUDA: {message}")


def _frame_tensors(error: BaseException) -> list:
    """The CUDA tensors the failed capture's frames hold (locals, and lists, tuples and dicts of
    them two levels down), parameters excluded: what its allocations live in."""
    found, seen = [], set()

    def collect(value, depth):
        if isinstance(value, torch.Tensor):
            if value.is_cuda and not isinstance(value, torch.nn.Parameter) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif depth and isinstance(value, (list, tuple)):
            for v in value:
                collect(v, depth - 1)
        elif depth and isinstance(value, dict):
            for v in value.values():
                collect(v, depth - 1)

    tb = error.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            collect(value, 2)
        tb = tb.tb_next
    return found


def keep(what: str, objects: list) -> None:
    """Keeps `objects` (graphs, tensors) for the life of the process: under cudaMallocAsync freeing
    them would abort it. A leak, logged with its size."""
    tensors = [t for t in objects if isinstance(t, torch.Tensor)]
    size = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
    _KEPT.append(list(objects))
    _KEPT_BYTES[0] += size
    log.error("%s: %d tensors (%.1f MiB) kept, not freed, for as long as ComfyUI runs (freeing them would stop "
              "it); %.1f MiB kept so far", what, len(tensors), size / 2**20, _KEPT_BYTES[0] / 2**20)


def kept_bytes() -> int:
    """Bytes of GPU memory kept by keep() in this process."""
    return _KEPT_BYTES[0]


def _first_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


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


def undo_failed_capture(graph: torch.cuda.CUDAGraph, device: torch.device, pool, begun: bool = True) -> None:
    """What a failed capture leaves behind, undone: the allocator's capture state, the capture's
    hold on its memory pool, the random generator's capture mode.

    torch's capture_end stops at the failed cudaStreamEndCapture, before it tells the allocator
    that the capture ended. Under cudaMallocAsync the allocator then believes a capture is still
    under way, and every later capture in the process fails ("capture_free_streams.empty()
    INTERNAL ASSERT FAILED"); under torch's native allocator the failed graph never releases its
    pool, whose memory stays reserved for the life of the process. A graph that did end (its pool
    readable) releases the pool itself."""
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
