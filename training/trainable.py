"""What the optimizer trains: a full copy of the UNet, or LoRA adapters on the host's UNet.

"full" trains a float32 deep copy (the host's module is never modified); "lora" hooks adapters
onto the host's module and takes them off again in `close()`. Either way the loop sees the same
thing: a module to call as module(x, t, **cond), its trainable parameters by name, and an
`export` turning parameter values (the weights, or their EMA) into the file to deliver.
"""
from __future__ import annotations

import contextlib
import functools

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .graphed import cuda_malloc_async

try:  # inside the pack (ComfyUI imports it as a package)
    from ..lora_hooks import DEFAULT_TARGETS, inject_lora, lora_state_dict
except ImportError:  # `training` imported as a top-level package (tools/, tests/: the repo root on sys.path)
    from lora_hooks import DEFAULT_TARGETS, inject_lora, lora_state_dict

MODES = ("full", "lora")
_NONE = object()  # a module without an instance attribute of that name


@dataclass
class Trainable:
    module: nn.Module  # called as module(x_t, t, **cond)
    params: dict[str, nn.Parameter]  # the optimizer's parameters, by their saved name, fixed order
    export: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]  # param values -> deliverable
    close: Callable[[], None]  # give the host's module back as it was
    owner: nn.Module | None = None  # a module holding `params` that `module` does not (LoRA: the adapters); for DDP
    # () -> a context within which the host's module computes as it did before training (LoRA: the
    # adapters suspended); "full" never modifies it
    suspended: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def full_copy(unet: nn.Module, device: torch.device | None = None) -> Trainable:
    """A float32 deep copy of the UNet with every parameter trainable; on `device` (None: where the
    UNet is), each tensor copied there on its own (fsdp copies to the CPU: a model whose fp32 copy
    does not fit the GPU beside its base, which fully_shard then moves there shard by shard).

    Deliverable: the copy's state dict (UNet keys, no prefix) with the given parameter values.
    """
    memo = {}
    if device is not None:  # deepcopy takes these for the tensors it meets (keyed by id), so none is copied on the GPU
        memo.update({id(p): nn.Parameter(p.detach().to(device, torch.float32, copy=True)) for p in unet.parameters()})
        memo.update({id(b): b.detach().to(device, torch.float32 if b.is_floating_point() else b.dtype, copy=True)
                     for b in unet.buffers()})
    model = copy.deepcopy(unet, memo).float().requires_grad_(True)
    params = dict(model.named_parameters())

    def export(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: values.get(k, v).detach() for k, v in model.state_dict().items()}

    return Trainable(model, params, export, lambda: None)


def lora_adapters(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> Trainable:
    """LoRA adapters on the host's UNet (base frozen). Deliverable: a ComfyUI LoRA file's tensors."""
    network = inject_lora(unet, rank, alpha, targets, seed)
    return Trainable(unet, network.named_params(), lambda values: lora_state_dict(network, values), network.remove, owner=network,
                     suspended=network.suspended)


def _function_modes() -> list:
    """The torch function modes active now (innermost last)."""
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


def _in_modes(modes: list, forward, *args, **kwargs):
    """forward under `modes` unless they are active already (the first pass; the recomputation in
    backward runs without them: autograd does not carry them there)."""
    if _function_modes() == modes:
        return forward(*args, **kwargs)
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        return forward(*args, **kwargs)


def enable_gradient_checkpointing(model: nn.Module, names: Sequence[str], preserve_rng_state: bool = True) -> Callable[[], None]:
    """Recompute the named submodules' activations in backward (torch.utils.checkpoint,
    use_reentrant=False) instead of storing them. Returns the function that undoes it.
    The recomputation runs under the torch function modes active at the forward call (a host's
    rewrite of in-place ops, for one), as the forward did. preserve_rng_state=False: the random
    state is not saved for the recomputation (a CUDA graph capture cannot read it; the UNets
    trained here draw no random numbers in their forward). Under the cudaMallocAsync allocator
    the recomputation runs whole blocks: its early stop (an exception raised from a saved-tensor
    hook inside an op) came back as "conv2d returned NULL without setting an exception"
    (ComfyUI 0.33, LoRA, bf16, H200, torch 2.11; docs/GPU_TIER.md).
    """
    early_stop = not cuda_malloc_async()
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"gradient_checkpointing: the UNet has no submodule named {unknown}; give module paths such as 'input_blocks.1'")
    wrapped = []  # (module, its own instance `forward` before ours, or _NONE)
    for name in names:
        module = modules[name]
        forward = module.forward
        wrapped.append((module, module.__dict__.get("forward", _NONE)))

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                modes = _function_modes()
                return checkpoint(functools.partial(_in_modes, modes, _forward), *args, use_reentrant=False,
                                  preserve_rng_state=preserve_rng_state, early_stop=early_stop, **kwargs)
            return _forward(*args, **kwargs)

        module.forward = checkpointed  # an instance attribute: the class is untouched

    def undo() -> None:
        """Each module's `forward` exactly as it was: its own instance attribute (a wrapper another
        pack or the host set) put back, else ours removed (the class's shows again). In reverse
        order, so that a module named twice ends with what it had before the first."""
        for module, previous in reversed(wrapped):
            if previous is _NONE:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous

    return undo


def ema_init(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The EMA starts at the current weights (float32 copies)."""
    return {k: p.detach().float().clone() for k, p in params.items()}


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay of update `step` (1-based), with warm-up: min(decay, (1 + t) / (10 + t)).

    The num_updates rule of TensorFlow's tf.train.ExponentialMovingAverage (diffusers' EMAModel
    with use_ema_warmup=False applies it one step later): early updates average over the few
    steps there are, so the starting weights fade within tens of steps instead of keeping a
    weight of decay^t (0.999^1000 = 37 %). It depends on the step alone, so a resumed run
    continues it exactly.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, for every parameter (decay: this step's, see ema_decay_at)."""
    torch._foreach_lerp_(list(ema.values()), [p.detach().float() for p in params.values()], 1.0 - decay)
