"""The fast path for a domain term's prediction d_k = domain_k(x, "") in each sampling step.

Why: at Stable Diffusion sizes on a GPU, the step time of the straightforward guider is set by
the host's Python work, not by the GPU: every UNet call is ~2000 kernel launches, and the host's
per-call bookkeeping (conds, areas, memory checks, hook weight swaps) comes on top. A domain row
in a call of its own therefore costs a whole step more, although its GPU work is small
(docs/BENCHMARKS.md, "Sampling").

What: a DomainForward makes the host's own call for the domain row once (comfy.samplers.
calc_cond_batch, the straightforward path) and records the single apply_model call inside it.
Every later step:

- calls apply_model with the recorded conditioning directly: the same kernels on the same
  inputs, hence the same numbers, without the per-step bookkeeping;
- on CUDA, replays that call as a CUDA graph: one launch per step instead of thousands;
- is called before the base rows, so the GPU computes the domain row while the CPU is still
  launching the base model's layers.

A LoRA domain (a clone of the base with LoRA patches) runs on the base's own modules, its LoRA
added per module as scale * up(down(x)) by forward hooks that exist only inside the domain's
call: no second copy of the weights and no weight swap per step.

Whatever the path cannot reproduce exactly (ControlNet in the domain row, masks, areas, timestep
ranges, model-function wrappers, weights that move between steps, LoRA variants other than
plain LoRA) falls back to the straightforward path. INDOMAIN_FAST_DOMAIN=0 turns the fast path
off, INDOMAIN_FAST_DOMAIN=eager keeps it without CUDA graphs.
"""
from __future__ import annotations

import contextlib
import logging
import os
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
    """'graph' (default), 'eager' (no CUDA graphs) or 'off' (the straightforward guider)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "eager" if value == "eager" else "graph"


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


# -- one domain row per step -------------------------------------------------------------------

def plain_cond(cond: list) -> str | None:
    """Why `cond` is not a single plain row (None if it is)."""
    if len(cond) != 1:
        return f"{len(cond)} conditioning entries"
    extra = [k for k in _NOT_PLAIN if cond[0].get(k) is not None and not (k == "strength" and cond[0][k] == 1.0)]
    return f"conditioning with {', '.join(extra)}" if extra else None


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class _CudaGraph:
    """fn(x, t) captured once, replayed on new inputs copied into its static buffers."""

    def __init__(self, fn, x: torch.Tensor, t: torch.Tensor):
        self.x, self.t = x.clone(), t.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = fn(self.x, self.t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out.clone()


class DomainForward:
    """d(x, t) for one domain row: the host's call first, then the recorded call (see module doc)."""

    def __init__(self, name: str, model, get_cond, model_options: dict, branches: list[LoraBranch] | None = None,
                 use_graph: bool = True):
        self.name = name
        self.model = model  # the host's BaseModel (the base's own for a LoRA domain)
        self.get_cond = get_cond  # the row's conditioning as the host has processed it for this run
        self.model_options = model_options
        self.branches = branches
        self.use_graph = use_graph
        self.cache: dict = {}
        self.kwargs = None  # the recorded apply_model keyword arguments
        self.shape = None
        self.graph = None
        self.params = None
        self.path = "host"  # "host" | "direct" | "graph"
        self.reason = "a model_function_wrapper is set" if "model_function_wrapper" in model_options else None
        self.reported = False

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.kwargs is not None and x.shape == self.shape:
            if self.graph is not None:
                if self._weights_moved():
                    self.graph = None
                    return self._record(x, timestep)
                return self.graph(x, timestep)
            return self._direct(x, timestep)
        return self._record(x, timestep)

    # the recorded call, made directly
    def _direct(self, x, timestep):
        kwargs = dict(self.kwargs)
        kwargs["transformer_options"] = {**kwargs["transformer_options"], "sigmas": timestep}
        with lora_applied(self.branches, self.cache):
            return self.model.apply_model(x, torch.cat([timestep]), **kwargs)

    def _host_call(self, x, timestep):
        with lora_applied(self.branches, self.cache):
            return comfy.samplers.calc_cond_batch(self.model, [self.get_cond()], x, timestep, self.model_options)[0]

    def _record(self, x, timestep):
        self.reason = self.reason or plain_cond(self.get_cond())
        if self.reason is not None:
            self._report()
            return self._host_call(x, timestep)
        calls = []
        real = self.model.apply_model

        def recorder(input_x, t, **kwargs):
            calls.append((input_x, t, kwargs))
            return real(input_x, t, **kwargs)

        graph = self.use_graph and x.device.type == "cuda" and self._graph_safe()
        stream = torch.cuda.Stream(device=x.device) if graph else None
        own = self.model.__dict__.get("apply_model")  # another pack may have set one on the instance
        self.model.apply_model = recorder
        try:
            if stream is not None:  # the host's call doubles as the warm-up a CUDA graph capture needs
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):
                    out = self._host_call(x, timestep)
                torch.cuda.current_stream(x.device).wait_stream(stream)
            else:
                out = self._host_call(x, timestep)
        finally:
            if own is None:
                del self.model.apply_model
            else:
                self.model.apply_model = own
        if len(calls) != 1 or calls[0][0].shape != x.shape or calls[0][2].get("control") is not None:
            self.reason = f"the host's call was not one model call on the whole row ({len(calls)} calls)"
            self._report()
            return out
        # The conditioning tensors on the model's device once (the host copies them there on every call;
        # a CUDA graph cannot capture a copy from pageable CPU memory): the same values either way.
        self.kwargs = {k: v if k == "transformer_options" else _to_device(v, x.device) for k, v in calls[0][2].items()}
        self.shape, self.path = x.shape, "direct"
        if graph:
            try:
                self.graph = _CudaGraph(self._direct, x, timestep)
                self.params = [(p, p.data_ptr()) for p in self.model.parameters()]
                self.path = "graph"
            except Exception as e:  # an op the capture cannot take: keep the direct call
                log.warning("domain '%s': CUDA graph capture failed (%s: %s); calling the model directly",
                            self.name, type(e).__name__, e)
                self.graph = None
        self._report()
        return out

    def _graph_safe(self) -> bool:
        patcher = getattr(self.model, "current_patcher", None)
        if getattr(patcher, "is_dynamic", lambda: False)():
            return False  # dynamic VRAM (newer ComfyUI, e.g. 0.33 on NVIDIA) pages weights in per call
        for m in self.model.modules():
            if getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
                return False  # weights cast or patched inside the forward (low VRAM, hooks): addresses not fixed
        return all(p.device.type == "cuda" for p in self.model.parameters())

    def _weights_moved(self) -> bool:
        return any(p.data_ptr() != ptr for p, ptr in self.params)

    def _report(self):
        if self.reported:
            return
        self.reported = True
        if self.reason is not None:
            log.info("domain '%s': straightforward path (%s)", self.name, self.reason)
        else:
            log.info("domain '%s': fast path (%s%s)", self.name, self.path, ", LoRA as adapters" if self.branches else "")
