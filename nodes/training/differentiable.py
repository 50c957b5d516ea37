"""The host's model and modules, made differentiable for the length of a training run.

The weights. The host loads and moves models in inference mode, so their weights are inference
tensors, which autograd refuses to save for backward: load_for_training loads the base's UNet and
replaces them by ordinary copies (make_autograd_safe), weights_for_autograd gives them back as the
host makes them afterwards (give_back_to_host). Under the host's dynamic VRAM, whose layers page
their weights in outside autograd, training runs on the host's non-dynamic copy of the base
(for_training). Where the host keeps fp16/bf16 weights and training feeds fp32 activations, the
host's own manual cast is switched on for the block (weights_cast_to_input).

The ops. Sampling never needs a backward pass, so some of the host's code has none: its comfy-kitchen ops
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
import logging
import weakref

import torch
from torch.overrides import TorchFunctionMode

import comfy.model_management
import comfy.ops

from ..dynamic_vram import cannot_copy, non_dynamic_copy, patcher_is_dynamic, release
from .families import Family

log = logging.getLogger(__name__)
_NONE = object()  # a layer without a comfy_cast_weights of its own (only its class's)
_copies = weakref.WeakSet()  # the host's non-dynamic copies that for_training made


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
def host_in_training(family: Family | None = None, checkpointing: bool = False):
    """Within the block the host computes what autograd can differentiate. Its comfy-kitchen ops
    (the fused rotary embedding of Flux and Z-Image) have no backward: ComfyUI 0.33 switches to
    plain torch ops while comfy.model_management.in_training is set (what its own LoRA trainer
    does); older hosts (0.8.0) bind the kitchen's ops at import, in comfy.ldm.flux.math and in the
    modules that import them from there, so those bindings are swapped for the same plain ops for
    the block. For a `family` whose blocks add in place (its row in families.py), those adds are made
    out of place within the block (_OutOfPlaceAdds). With `checkpointing`, attention runs without cuDNN's
    kernel (_attention_without_cudnn). Restored on exit, also after an error or Cancel."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_differentiable_host_ops())
        if family is not None and family.adds_in_place:
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


def for_training(model):
    """The MODEL to train on: `model` itself, or under the host's dynamic VRAM (ComfyUI 0.33+ on
    NVIDIA, where the weights stay in host memory and each layer pages its weights into a VRAM slot
    per call, outside autograd) the host's own non-dynamic delegate of it: the same file and patches
    loaded as a classic model (what the host itself uses for weight hooks; cached on the patcher,
    at the cost of a second copy of the weights in RAM)."""
    if not patcher_is_dynamic(model):
        return model
    if cannot_copy(model):
        raise ValueError(
            "model: under ComfyUI's dynamic VRAM, training needs a base MODEL that the host can load "
            "again without it, i.e. one from the host's own loaders (Load Checkpoint, Load Diffusion "
            "Model); this one came from a node that gives no such recipe. Load the base with the host's "
            "loader, or start ComfyUI with --disable-dynamic-vram")
    log.info("dynamic VRAM: training on the host's non-dynamic copy of the base (its weights on the GPU, "
             "for autograd)")
    copy = non_dynamic_copy(model)
    _copies.add(copy)
    return copy


def load_for_training(model) -> torch.nn.Module:
    """The base's UNet on the device, whole (the host's model management loads it, with the base's
    LoRAs merged), its weights usable by autograd. Cheap when it is loaded already; called again
    wherever the host may have unloaded it (VAE encoding, previews), so that training goes on with
    the weights it trains, where it trains them. If it fails on a copy that for_training made, the
    copy is released (dynamic_vram.release) before the error goes on: the host lists it among its
    loaded models once it loads it, and a failure here may come before its caller releases it."""
    try:
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        unet = model.model.diffusion_model
        make_autograd_safe(unet)
    except BaseException:
        if model in _copies:
            release(model)
        raise
    return unet


@contextlib.contextmanager
def weights_cast_to_input(module: torch.nn.Module, needed: bool = True):
    """Within the block, every layer of `module` casts its weight to its input's dtype, by the
    host's own manual cast (the comfy_cast_weights flag of its ops, what the host sets for weights
    stored in a dtype the GPU does not compute in). On exit, also on error, each layer's flag is
    exactly what it was: its own value again, or none of its own where only its class had one.

    Needed wherever a layer meets inputs of another dtype than its weights without autocast: on
    a GPU the host keeps the UNet in fp16/bf16 and calls it without casting, so training it in
    fp32 (LoRA mode) feeds fp32 activations to fp16 weights; a float32 full copy standing in for
    the host's UNet in a preview gets the host's fp16 inputs. Layers without the flag (not the
    host's ops) are left alone."""
    changed = [m for m in module.modules() if getattr(m, "comfy_cast_weights", None) is False] if needed else []
    before = [m.__dict__.get("comfy_cast_weights", _NONE) for m in changed]
    for m in changed:
        m.comfy_cast_weights = True
    try:
        yield len(changed)
    finally:
        for m, flag in zip(changed, before):
            if flag is _NONE:
                m.__dict__.pop("comfy_cast_weights", None)
            else:
                m.__dict__["comfy_cast_weights"] = flag


def mixed_dtypes(module: torch.nn.Module, compute: torch.dtype) -> bool:
    """True if some floating-point weight of `module` is stored in another dtype than `compute`."""
    return any(p.is_floating_point() and p.dtype != compute for p in module.parameters())


def _replace_tensors(module: torch.nn.Module, wanted) -> int:
    """Replace each parameter and buffer t of `module` with wanted(t) is True by a copy with the same
    values, made in the current inference mode (a Parameter stays a Parameter, its flag kept).
    Returns how many were replaced. The copy reads t without a view of it: a tensor in the state
    described at make_autograd_safe refuses views."""
    replaced = 0
    with torch.no_grad():
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for name, t in store.items():
                    if t is not None and wanted(t):
                        copy = torch.empty_like(t).copy_(t)
                        store[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy
                        replaced += 1
    return replaced


def _not_for_autograd(t: torch.Tensor) -> bool:
    """An inference tensor, or a tensor without a version counter: a Parameter made outside
    inference mode whose data the host replaced inside it (moving the model between devices
    while it executes a graph)."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace the host's weights that autograd cannot use (created under the host's inference mode,
    which autograd refuses to save for backward, or left without a version counter) by ordinary
    copies with the same values. Returns how many were replaced. give_back_to_host undoes it."""
    with torch.inference_mode(False):
        return _replace_tensors(module, _not_for_autograd)


def give_back_to_host(module: torch.nn.Module) -> int:
    """The host's weights as the host makes them: inference tensors (it loads and moves models while
    it executes a graph, in inference mode; an ordinary Parameter whose data it then replaced by an
    inference tensor would refuse every view, in the host's sampling as in the next training)."""
    with torch.inference_mode():
        return _replace_tensors(module, lambda t: not t.is_inference())


@contextlib.contextmanager
def weights_for_autograd(model):
    """Within the block the base's UNet is loaded (load_for_training) with weights autograd can use;
    afterwards, also after an error or Cancel, its weights are the host's kind again."""
    try:
        yield load_for_training(model)
    finally:
        give_back_to_host(model.model.diffusion_model)
