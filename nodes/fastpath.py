"""The fast path of a sampling step: the model calls of the domain rows and of the base rows.

Why: at Stable Diffusion sizes on a GPU, a UNet call is ~2000 kernel launches, and the host's
Python work launching them (plus its per-call bookkeeping: conds, areas, memory checks, hook
weight swaps) takes longer than the GPU's work at batch 1 (docs/BENCHMARKS.md, "Sampling").
The straightforward guider paid a whole extra call per step for each domain row.

What: a RecordedCall makes the host's own call for a list of rows once (comfy.samplers.
calc_cond_batch, the straightforward path) and records the single apply_model call inside it.
Every later step with the same rows:

- calls apply_model with the recorded conditioning directly: the same kernels on the same
  inputs, hence the same numbers, without the per-step bookkeeping;
- on CUDA, replays that call as a CUDA graph: one launch per step instead of thousands, so the
  step costs the GPU's time, not the CPU's (the graphs of a run share one memory pool);
- for the domain rows (DomainForward), is launched before the base rows.

A LoRA domain (a clone of the base with LoRA patches) runs on the base's own modules, its LoRA
added per module as scale * up(down(x)) by forward hooks that exist only inside the domain's
call: no second copy of the weights and no weight swap per step.

Whatever the recording cannot reproduce exactly falls back to the host's call every step:
ControlNet, masks, areas, timestep ranges, hooks, model-function and calc_cond_batch wrappers,
per-step model callbacks, rows the host splits over several calls (low memory) or GPUs, LoRA
variants other than plain LoRA. No CUDA graph (the direct call instead) where Python inside the
forward may act differently per step (model patches such as FreeU, wrappers other than the
host's torch.compile one) or the weights are not at fixed addresses (low VRAM, dynamic VRAM);
weights that move between steps are re-recorded; a capture that fails leaves the direct call
(and the random generator as it was). A LoRA domain on a compiled model stays a weight hook:
torch.compile does not see forward hooks added after it traced a module.
INDOMAIN_FAST_DOMAIN=0 turns the fast path off, =eager keeps it without CUDA graphs, =domain
records only the domain rows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.samplers
import comfy.utils

log = logging.getLogger(__name__)

ENV = "INDOMAIN_FAST_DOMAIN"
# Entries of a cond that make its prediction more than one plain apply_model call on all of x.
_NOT_PLAIN = ("area", "mask", "strength", "hooks", "control", "timestep_start", "timestep_end", "default", "gligen")


def mode() -> str:
    """'graph' (default), 'eager' (no CUDA graphs), 'domain' (only the domain rows recorded, the
    base rows through the host's call every step) or 'off' (the straightforward guider)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return value if value in ("eager", "domain") else "graph"


# -- a LoRA domain as per-module adapters ------------------------------------------------------

@dataclass(frozen=True)
class LoraBranch:
    """scale * up(down(x)) added to one Linear or Conv2d's output."""

    module: torch.nn.Module
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    scale: float  # strength * alpha / rank

    def __call__(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        key = (id(self), x.device, x.dtype)
        if key not in cache:
            cache[key] = (self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype))
        down, up = cache[key]
        if down.ndim == 4:
            m = self.module
            return F.conv2d(F.conv2d(x, down, None, m.stride, m.padding, m.dilation), up)
        return F.linear(F.linear(x, down), up)


def lora_branches(model: torch.nn.Module, extra_patches: dict) -> list[LoraBranch] | None:
    """The host's weight patches `extra_patches` (key -> [patch tuple]) as LoRA branches on the
    modules of `model`, or None if any patch is not a plain LoRA of a Linear or Conv2d weight
    (LoHa, LoKr, DoRA, LoCon mid weights, offsets, functions, strength_model != 1)."""
    from comfy.weight_adapter.lora import LoRAAdapter

    branches = []
    for key, patches in extra_patches.items():
        if not isinstance(key, str) or not key.endswith(".weight"):
            return None
        try:
            module = comfy.utils.get_attr(model, key[: -len(".weight")])
        except AttributeError:
            return None
        conv = isinstance(module, torch.nn.Conv2d) and module.groups == 1
        if not (conv or isinstance(module, torch.nn.Linear)):
            return None
        for strength, adapter, strength_model, offset, function in patches:
            if type(adapter) is not LoRAAdapter or strength_model != 1.0 or offset is not None or function is not None:
                return None
            up, down, alpha, mid, dora_scale, reshape = adapter.weights
            if mid is not None or dora_scale is not None or reshape is not None:
                return None
            want = 4 if conv else 2
            if down.ndim != want or up.ndim != want or (conv and tuple(up.shape[2:]) != (1, 1)):
                return None
            rank = down.shape[0]
            scale = float(strength) * (float(alpha) / rank if alpha is not None else 1.0)
            branches.append(LoraBranch(module, down, up, scale))
    return branches or None


@contextlib.contextmanager
def lora_applied(branches: list[LoraBranch] | None, cache: dict):
    """Forward hooks adding each branch to its module's output, removed on exit."""
    handles = []
    try:
        for b in branches or ():
            handles.append(b.module.register_forward_hook(
                lambda module, args, output, b=b: torch.add(output, b(args[0], cache), alpha=b.scale)))
        yield
    finally:
        for h in handles:
            h.remove()


# The host's TorchCompileModel (comfy_api.torch_helpers.set_torch_compile_wrapper): an
# APPLY_MODEL wrapper under this key, and its torch.compile arguments in model_options.
_HOST_COMPILE_KEY = "torch.compile"
_HOST_COMPILE_KWARGS = "torch_compile_kwargs"


def compiled_reason(*patchers) -> str | None:
    """Why the LoRA adapters' forward hooks could go unseen (None if they cannot): a compiled UNet.
    Dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so a
    graph it traced for a call without the hooks (the base's rows, a plain KSampler of the same
    shape) would be reused for the domain's call with the LoRA silently left out."""
    for patcher in patchers:
        options = patcher.model_options
        sources = (getattr(patcher, "wrappers", {}), options.get("transformer_options", {}).get("wrappers", {}))
        wrapper_keys = {key for wrappers in sources for kind in wrappers.values() for key, fns in kind.items() if fns}
        if options.get(_HOST_COMPILE_KWARGS) or any("compile" in str(key).lower() for key in wrapper_keys):
            return "the model is compiled (torch.compile wrapper)"
    for m in patchers[0].model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule":
            return "a module of the model is compiled"
    return None


# -- recorded model calls ----------------------------------------------------------------------

def plain_cond(cond: list) -> str | None:
    """Why `cond` is not a single plain row (None if it is)."""
    if len(cond) != 1:
        return f"{len(cond)} conditioning entries"
    extra = [k for k in _NOT_PLAIN if cond[0].get(k) is not None and not (k == "strength" and cond[0][k] == 1.0)]
    return f"conditioning with {', '.join(extra)}" if extra else None


def host_state_reason(model, model_options: dict) -> str | None:
    """Why the host's calc_cond_batch does more per step than the one model call it makes (None if
    it does not): wrappers of the whole call, per-step callbacks, hooks that swap weights."""
    import comfy.patcher_extension as ext

    if "model_function_wrapper" in model_options:
        return "a model_function_wrapper is set"
    if model_options.get("multigpu_clones"):
        return "the rows are spread over several GPUs"  # newer ComfyUI's multi-GPU cond batching
    if ext.get_all_wrappers(ext.WrappersMP.CALC_COND_BATCH, model_options, is_model_options=True):
        return "a calc_cond_batch wrapper is set"
    patcher = getattr(model, "current_patcher", None)
    if patcher is not None:
        if patcher.get_all_callbacks(ext.CallbacksMP.ON_PREPARE_STATE):
            return "per-step model callbacks are set"
        if getattr(patcher, "hook_patches", None) or getattr(patcher, "forced_hooks", None) is not None:
            return "hook weight patches are registered"
    return None


def graph_reason(model, kwargs: dict) -> str | None:
    """Why the recorded call cannot be a CUDA graph (None if it can): Python code inside the
    forward that may act differently per step, or weights not at fixed addresses."""
    options = kwargs.get("transformer_options", {})
    for key in ("patches", "patches_replace"):
        if any(options.get(key, {}).values()):
            return f"model {key.replace('_', ' ')} are set"
    # The host's compile wrapper only swaps the compiled module in for the call, the same every
    # step, so the call can be a CUDA graph (compiled in the host's call of the first step, before
    # the capture) if inductor made no CUDA graphs of its own (the "cudagraphs" backend, the
    # "reduce-overhead" / "max-autotune" modes: graphs that cannot be captured inside ours).
    wrappers = {key for kind in options.get("wrappers", {}).values() for key, fns in kind.items() if fns}
    if wrappers - {_HOST_COMPILE_KEY}:
        return "model wrappers are set"
    patcher = getattr(model, "current_patcher", None)
    if wrappers:
        compile_kwargs = getattr(patcher, "model_options", {}).get(_HOST_COMPILE_KWARGS) or {}
        backend, compile_mode = compile_kwargs.get("backend"), compile_kwargs.get("mode")
        if backend != "inductor" or compile_mode not in (None, "default", "max-autotune-no-cudagraphs"):
            return f"torch.compile with backend {backend!r}, mode {compile_mode!r} (may make CUDA graphs of its own)"
    if getattr(patcher, "is_dynamic", lambda: False)():
        return "dynamic VRAM pages weights in per call"  # newer ComfyUI, e.g. 0.33 on NVIDIA
    for m in model.modules():
        if getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
            return "weights cast or patched inside the forward"  # low VRAM, hooks
    if not all(p.device.type == "cuda" for p in model.parameters()):
        return "weights not on the GPU"
    return None


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


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


class _CudaGraph:
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


class _Record:
    """The host's one apply_model call for a fixed list of rows, recorded."""

    def __init__(self, shape, reason=None):
        self.shape = shape  # x's shape
        self.reason = reason  # why the host's call is made every step instead (None: recorded)
        self.kwargs = None  # apply_model keyword arguments (conditioning on the device)
        self.order: list[int] = []  # row index of each batch chunk of the call
        self.graph: _CudaGraph | None = None
        self.path = "host"  # "host" | "direct" | "graph"


class RecordedCall:
    """Rows of one model, rows -> [prediction per row] as comfy.samplers.calc_cond_batch gives them:
    the host's call first, then its recorded model call (see module doc)."""

    MAX_RECORDS = 8  # row lists per run (a partial interval gives two); more means they change per step

    def __init__(self, name: str, model, model_options: dict | None = None, branches: list[LoraBranch] | None = None,
                 use_graph: bool = True, pool: GraphPool | None = None):
        self.name = name
        self.model = model  # the host's BaseModel (the base's own for a LoRA domain)
        self.model_options = model_options
        self.branches = branches
        self.use_graph = use_graph
        self.pool = pool or GraphPool()
        self.cache: dict = {}
        self.records: dict[tuple, _Record] = {}
        self.params = None  # (parameter, address) at capture time
        self.reported: set = set()

    def __call__(self, rows: list, x: torch.Tensor, timestep: torch.Tensor, model_options: dict | None = None) -> list:
        options = self.model_options if model_options is None else model_options
        key = (id(options),) + tuple(None if r is None else id(r) for r in rows)
        rec = self.records.get(key)
        if rec is not None and rec.shape == x.shape:
            if rec.reason is not None:
                return self._host_call(rows, x, timestep, options)
            if rec.graph is not None:
                if self._weights_moved():
                    self.records.clear()
                    return self._record(key, rows, x, timestep, options)
                return self._split(rec, rec.graph(x, timestep), rows, x)
            return self._split(rec, self._direct(rec, x, timestep), rows, x)
        return self._record(key, rows, x, timestep, options)

    def _host_call(self, rows, x, timestep, options):
        with lora_applied(self.branches, self.cache):
            return comfy.samplers.calc_cond_batch(self.model, rows, x, timestep, options)

    def _direct(self, rec: _Record, x, timestep):
        """The recorded call made directly: the same kernels on the same inputs as the host's."""
        kwargs = dict(rec.kwargs)
        kwargs["transformer_options"] = {**kwargs["transformer_options"], "sigmas": timestep}
        n = len(rec.order)
        with lora_applied(self.branches, self.cache):
            return self.model.apply_model(torch.cat([x] * n), torch.cat([timestep] * n), **kwargs)

    @staticmethod
    def _split(rec: _Record, out, rows, x) -> list:
        """The batched output [n*B, ...] as the host returns it: one prediction per row, zeros for a
        None row (mask and strength are 1 for a plain row, so the host's weighted sum is the output)."""
        preds = [torch.zeros_like(x) for _ in rows]
        for chunk, index in zip(out.chunk(len(rec.order)), rec.order):
            preds[index] = chunk.to(x.dtype)
        return preds

    def _record(self, key, rows, x, timestep, options):
        if len(self.records) >= self.MAX_RECORDS:
            rec = _Record(x.shape, f"more than {self.MAX_RECORDS} different calls in one run")
        else:
            rec = _Record(x.shape, host_state_reason(self.model, options)
                          or next((r for r in (plain_cond(c) for c in rows if c is not None) if r), None))
        self.records[key] = rec
        if rec.reason is not None:
            self._report(rec, len(rows))
            return self._host_call(rows, x, timestep, options)
        calls = []
        real = self.model.apply_model

        def recorder(input_x, t, **kwargs):
            # transformer_options as the host passed it: the UNet adds its own keys to the dict during
            # the call (block, original_shape, ...), which a later call must not start with (a compiled
            # UNet's guards would see a different dict and recompile, inside a CUDA graph capture)
            calls.append((input_x, t, {**kwargs, "transformer_options": dict(kwargs.get("transformer_options", {}))}))
            return real(input_x, t, **kwargs)

        graph = self.use_graph and x.device.type == "cuda"
        stream = torch.cuda.Stream(device=x.device) if graph else None
        own = self.model.__dict__.get("apply_model")  # another pack may have set one on the instance
        self.model.apply_model = recorder
        try:
            if stream is not None:  # the host's call doubles as the warm-up a CUDA graph capture needs
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):
                    preds = self._host_call(rows, x, timestep, options)
                torch.cuda.current_stream(x.device).wait_stream(stream)
            else:
                preds = self._host_call(rows, x, timestep, options)
        finally:
            if own is None:
                del self.model.apply_model
            else:
                self.model.apply_model = own
        wanted = sorted(i for i, c in enumerate(rows) if c is not None)
        order = list(calls[0][2].get("transformer_options", {}).get("cond_or_uncond", [])) if len(calls) == 1 else []
        if (len(calls) != 1 or sorted(order) != wanted or calls[0][0].shape != (len(order) * x.shape[0], *x.shape[1:])
                or calls[0][2].get("control") is not None):
            rec.reason = f"the host's call was not one model call on all rows ({len(calls)} calls)"
            self._report(rec, len(rows))
            return preds
        # The conditioning tensors on the model's device once (the host copies them there on every call;
        # a CUDA graph cannot capture a copy from pageable CPU memory): the same values either way.
        rec.kwargs = {k: v if k == "transformer_options" else _to_device(v, x.device) for k, v in calls[0][2].items()}
        rec.order, rec.path = order, "direct"
        why_not = graph_reason(self.model, rec.kwargs) if self.use_graph else "off"
        if graph and why_not is None:
            try:
                rec.graph = _CudaGraph(lambda gx, gt: self._direct(rec, gx, gt), x, timestep, self.pool)
                self.params = [(p, p.data_ptr()) for p in self.model.parameters()]
                rec.path = "graph"
                log.debug("%s: CUDA graph of %d rows captured (ms: set-up %s, capture %s, instantiate %s)",
                          self.name, len(rec.order), *rec.graph.timing_ms)
            except Exception as e:  # an op the capture cannot take: keep the direct call
                log.warning("%s: CUDA graph capture failed (%s: %s); calling the model directly",
                            self.name, type(e).__name__, e)
                rec.graph = None
        elif graph:
            log.info("%s: no CUDA graph (%s)", self.name, why_not)
        self._report(rec, len(rows))
        return preds

    def _weights_moved(self) -> bool:
        return self.params is not None and any(p.data_ptr() != ptr for p, ptr in self.params)

    def _report(self, rec: _Record, n_rows: int):
        what = (n_rows, rec.path, rec.reason)
        if what in self.reported:
            return
        self.reported.add(what)
        rows = f" ({n_rows} rows)" if n_rows > 1 else ""
        if rec.reason is not None:
            log.info("%s%s: straightforward path (%s)", self.name, rows, rec.reason)
        else:
            log.info("%s%s: fast path (%s%s)", self.name, rows, rec.path, ", LoRA as adapters" if self.branches else "")


class DomainForward:
    """d(x, t) = one domain row's prediction through a RecordedCall."""

    def __init__(self, name: str, model, get_cond, model_options: dict, branches: list[LoraBranch] | None = None,
                 use_graph: bool = True, pool: GraphPool | None = None):
        self.get_cond = get_cond  # the row's conditioning as the host has processed it for this run
        self.call = RecordedCall(f"domain '{name}'", model, model_options, branches, use_graph, pool)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.call([self.get_cond()], x, timestep)[0]
