"""CUDA graphs over the host's dynamic VRAM (ComfyUI 0.33+, its default on NVIDIA).

Under dynamic VRAM (comfy_aimdo) a model's weights stay in host memory and each layer has a slot
at a fixed address in a reserved range of GPU virtual memory (`module._v` = (vbar, address,
size)). A layer's forward faults its slot in (`vbar_fault` gives the signature of the physical
pages behind it), copies its weights there only when the signature differs from the one it last
filled (`module._v_weight`, `module._v_signature`), then unpins the slot, which another allocation
may later evict. So for a model that fits, a layer reads its weights at the same address every
step, and a CUDA graph of the whole call stays valid for as long as every slot keeps the pages it
had when the graph was captured: the check the host makes before replaying its own graphs
(comfy/model_prefetch.py), here on one span covering every slot of the model.

Slots(model).guard() pins that span and says whether the graph may replay; after a call the
layers made themselves (the fallback, which pages evicted weights back in), refresh() takes the
span's new signature if every layer is back in its slot, so the same graph replays again.
"""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def patcher_is_dynamic(patcher) -> bool:
    """True if the host pages this MODEL's weights in per layer (dynamic VRAM; False on older hosts)."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def is_dynamic(model) -> bool:
    """True if the host pages this BaseModel's weights in per layer (dynamic VRAM)."""
    return patcher_is_dynamic(getattr(model, "current_patcher", None))


def cannot_copy(patcher) -> bool:
    """True for a dynamic MODEL of which the host cannot make its non-dynamic copy: one from a node
    that left no reload recipe (cached_patcher_init), unlike the host's own loaders."""
    return patcher_is_dynamic(patcher) and getattr(patcher, "cached_patcher_init", None) is None


def _vbar_api():
    import comfy_aimdo.model_vbar as vbar  # present wherever the host has dynamic VRAM

    return vbar


class Slots:
    """The weight slots of a dynamic-VRAM model, as one span."""

    def __init__(self, model: torch.nn.Module):
        self.modules = [m for m in model.modules() if getattr(m, "_v", None) is not None]
        vbars = {id(m._v[0]) for m in self.modules}
        self.reason = None if len(vbars) == 1 else (
            "weights not on the GPU (no dynamic VRAM slots: the model is not loaded)" if not vbars else f"weight slots in {len(vbars)} reservations")
        self.span = None
        if self.reason is None:
            start = min(m._v[1] for m in self.modules)
            end = max(m._v[1] + m._v[2] for m in self.modules)
            self.span = (self.modules[0]._v[0], start, end - start)
        self.signature = None  # the span's pages when the graph last matched them

    def addresses(self) -> list:
        """Where the slots are (a model reloaded into new slots must be recorded again)."""
        return [(id(m._v[0]), m._v[1], m._v[2]) for m in self.modules]

    def all_filled(self) -> bool:
        """True if every layer's slot is resident and holds its weights (the signature it filled)."""
        vbar = _vbar_api()
        for m in self.modules:
            signature = vbar.vbar_fault(m._v)
            try:
                if not vbar.vbar_signature_compare(signature, getattr(m, "_v_signature", None)):
                    return False
            finally:
                if signature is not None:
                    vbar.vbar_unpin(m._v)
        return True

    def refresh(self) -> bool:
        """After the layers' own call: take the span's signature if every slot holds its weights."""
        self.signature = None
        if not self.all_filled():
            return False
        vbar = _vbar_api()
        signature = vbar.vbar_fault(self.span)
        if signature is not None:
            vbar.vbar_unpin(self.span)
        self.signature = signature
        return signature is not None

    @contextlib.contextmanager
    def guard(self):
        """Pins the span for the block; yields True if its pages are those of the last refresh()."""
        vbar = _vbar_api()
        signature = vbar.vbar_fault(self.span)
        try:
            yield signature is not None and vbar.vbar_signature_compare(signature, self.signature)
        finally:
            if signature is not None:
                vbar.vbar_unpin(self.span)


def settle_lazy_dtypes(module: torch.nn.Module) -> int:
    """Each weight in the dtype its layer was built for; returns how many were cast.

    While dynamic VRAM is on, the host builds a model's layers without weights and fills them
    lazily from the file, in the file's dtype (an fp32 checkpoint loaded as fp16 stays fp32): the
    dynamic patcher casts per call. The non-dynamic copy the host makes of such a model (its
    get_non_dynamic_delegate: weight hooks, and here training) runs its layers without that cast,
    so fp16 activations met fp32 weights ("mat1 and mat2 must have the same dtype"). Cast as a
    non-lazy load would have."""
    cast = 0
    with torch.no_grad():
        for m in module.modules():
            for key in ("weight", "bias"):
                want = getattr(m, key + "_comfy_model_dtype", None)
                p = m._parameters.get(key)
                if want is not None and p is not None and p.is_floating_point() and p.dtype != want:
                    m._parameters[key] = torch.nn.Parameter(p.detach().to(want), requires_grad=p.requires_grad)
                    cast += 1
    return cast


def non_dynamic_copy(patcher):
    """The host's non-dynamic delegate of a dynamic MODEL, its weights in their layers' dtypes."""
    delegate = patcher.get_non_dynamic_delegate()
    cast = settle_lazy_dtypes(delegate.model)
    if cast:
        log.info("non-dynamic copy of the model: %d weights cast to their layers' dtype", cast)
    return delegate


def release(patcher) -> None:
    """Unload a model (its host entries, clones' included) from the host's model management, as the
    host unloads a model to make room; it loads it again for the next node that needs it. For a
    non_dynamic_copy() before it is dropped (a loaded model whose patcher the garbage collector
    takes while the host walks its list of loaded models shifts that list under it: IndexError in
    the next node that loads a model), and for the base in full-mode training once the trained copy
    is made (the VRAM of a second, frozen UNet: 1.6 GiB for SD1.5 in fp16, 22 GiB for Flux.1 dev)."""
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.model is patcher.model:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)


def graph_reason(model) -> str | None:
    """Why a dynamic-VRAM model's call cannot be a CUDA graph (None if it can)."""
    for m in model.modules():
        if getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
            return "weights patched inside the forward (hooks)"
        if getattr(m, "_v", None) is None and getattr(m, "comfy_cast_weights", False):
            if any(p.device.type != "cuda" for p in m.parameters(recurse=False)):
                return "weights of a layer without a slot are not on the GPU"
    return Slots(model).reason


def streaming_mark():
    """What the host's own block streaming has done so far in this node: the argument of
    streamed_since(). Under dynamic VRAM some forwards (ComfyUI 0.33: LTX-2, MiniMax; newer hosts
    more) stream their blocks' weights in on a second stream themselves (comfy.model_prefetch: one
    queue per forward, cleared after each node), and newer hosts record allocation graphs and CUDA
    graphs of blocks inside the forward (their model compiler); None on hosts without either."""
    import sys

    prefetch = sys.modules.get("comfy.model_prefetch")
    if prefetch is None:
        return None
    queues = getattr(prefetch, "PREFETCH_QUEUES", None)
    return prefetch, queues, len(queues or ())


def streamed_since(mark) -> bool:
    """True if a forward since streaming_mark() streamed its blocks itself, or the host's model
    compiler ran in this node (its flag tells no more): a call whose CUDA graph would capture
    another stream's copies, the host's waits and its own graphs."""
    if mark is None:
        return False
    prefetch, queues, count = mark
    now = getattr(prefetch, "PREFETCH_QUEUES", None)
    return now is not queues or len(now or ()) != count or bool(getattr(prefetch, "MALLOC_GRAPH_USED", False))
