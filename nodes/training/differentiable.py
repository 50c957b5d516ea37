"""The host's modules, made differentiable for the length of a training run.

Sampling never needs a backward pass, so some of the host's code has none: its comfy-kitchen ops
(the fused rotary embedding of Flux and Z-Image) are not differentiable, and some blocks update
their residual stream in place (Flux's `img += ...`), which autograd refuses when an earlier op
saved that tensor. With gradient checkpointing, the recomputation in backward must save what the
forward saved, and cuDNN's attention kernel is not always chosen again there (seen with SD3.5
medium on an H200: the forward kept its [B, heads, tokens, 1] softmax statistics, the
recomputation took another kernel; NVIDIA NeMo turns cuDNN attention off under activation
checkpointing for the same error), so the block runs attention without cuDNN.
host_in_training() undoes all of this for the block, and restores everything on exit.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

import comfy.model_management
import comfy.ops

from .families import family_of


def _apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in plain torch ops (the host's own fallback, comfy/ldm/flux/math.py)."""
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    if x_.shape[2] != 1 and freqs_cis.shape[2] != 1 and x_.shape[2] != freqs_cis.shape[2]:
        freqs_cis = freqs_cis[:, :, :x_.shape[2]]
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    return _apply_rope1(xq, freqs_cis), _apply_rope1(xk, freqs_cis)


class _OutOfPlaceAdds(TorchFunctionMode):
    """In-place arithmetic on a tensor that autograd tracks, done out of place (same values).

    Some of the host's blocks update their residual stream in place (Flux's `img += ...`), which
    autograd refuses when an earlier op saved that tensor for backward (a LayerNorm does).
    `x += y` rebinds x to what __iadd__ returns, so a new tensor serves the block the same way."""

    OPS = {torch.Tensor.__iadd__: torch.add, torch.Tensor.__isub__: torch.sub, torch.Tensor.__imul__: torch.mul,
           torch.Tensor.add_: torch.add, torch.Tensor.sub_: torch.sub, torch.Tensor.mul_: torch.mul,
           torch.Tensor.addcmul_: torch.addcmul}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out_of_place = self.OPS.get(func)
        if out_of_place is not None and torch.is_grad_enabled() and isinstance(args[0], torch.Tensor) and (
                args[0].requires_grad or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args[1:])):
            return out_of_place(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_in_training(model=None, checkpointing: bool = False):
    """Within the block the host computes what autograd can differentiate. Its comfy-kitchen ops
    (the fused rotary embedding of Flux and Z-Image) have no backward: ComfyUI 0.33 switches to
    plain torch ops while comfy.model_management.in_training is set (what its own LoRA trainer
    does); older hosts (0.8.0) bind the kitchen's ops at import, in comfy.ldm.flux.math and in the
    modules that import them from there, so those bindings are swapped for the same plain ops for
    the block. For a family whose blocks add in place (families.py), those adds are made out of
    place within the block (_OutOfPlaceAdds). With `checkpointing`, attention runs without cuDNN's
    kernel (_attention_without_cudnn). Restored on exit, also after an error or Cancel."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_differentiable_host_ops())
        if model is not None and family_of(model).adds_in_place:
            stack.enter_context(_OutOfPlaceAdds())
        if checkpointing:
            stack.enter_context(_attention_without_cudnn())
        yield


@contextlib.contextmanager
def _attention_without_cudnn():
    """scaled_dot_product_attention without cuDNN's kernel: off in torch's flags, and out of the
    backend priority list the host's NVIDIA attention sets on each call (comfy.ops
    SDPA_BACKEND_PRIORITY, which enables exactly the backends it lists). Flash or memory-efficient
    attention then serve forward and recomputation alike."""
    from torch.nn.attention import SDPBackend

    priority = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    at = priority.index(SDPBackend.CUDNN_ATTENTION) if priority and SDPBackend.CUDNN_ATTENTION in priority else None
    if at is not None:
        priority.pop(at)  # in place: the host's function reads this list at each call
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
        if at is not None:
            priority.insert(at, SDPBackend.CUDNN_ATTENTION)


@contextlib.contextmanager
def _differentiable_host_ops():
    import sys

    mm = comfy.model_management
    if hasattr(mm, "in_training"):
        before = mm.in_training
        mm.in_training = True
        try:
            yield
        finally:
            mm.in_training = before
        return
    plain = {"apply_rope": _apply_rope, "apply_rope1": _apply_rope1}
    swapped = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("comfy.ldm.") or module is None:
            continue
        for attr, replacement in plain.items():
            fn = getattr(module, attr, None)
            if fn is not None and "comfy_kitchen" in (getattr(fn, "__module__", "") or "") + repr(fn):
                swapped.append((module, attr, fn))
                setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, fn in swapped:
            setattr(module, attr, fn)
