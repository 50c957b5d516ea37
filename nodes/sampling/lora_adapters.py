"""A LoRA domain as per-module adapters on the base's own modules.

A LoRA domain (a clone of the base with LoRA patches) runs on the base's modules, its LoRA added
per module as scale * up(down(x)) by forward hooks that exist only inside the domain's call: no
second copy of the weights and no weight swap per step. Patches other than plain LoRA (LoHa, LoKr,
DoRA, ...) keep the host's weight-hook path (lora_branches gives None). A compiled UNet keeps it
too: torch.compile does not see forward hooks added after it traced a module (compiled_reason).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.utils


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


class RowsMismatch(RuntimeError):
    """A module saw another batch than the call's: its rows are not the call's rows (lora_applied)."""


@contextlib.contextmanager
def lora_applied(branches: list[LoraBranch] | None, cache: dict, rows: tuple[int, int] | None = None, batch: int = 0):
    """Forward hooks adding each branch to its module's output, removed on exit. `rows` = (start,
    count): only to those rows of a call on `batch` rows (the domain's rows in the base's call,
    lora_rows_in_base_call.py); a module whose input has another batch raises RowsMismatch."""
    def add(module, args, output, b):
        if rows is None:
            return torch.add(output, b(args[0], cache), alpha=b.scale)
        if args[0].shape[0] != batch or output.shape[0] != batch:
            raise RowsMismatch(f"{type(module).__name__} saw a batch of {args[0].shape[0]}, the call has {batch} rows")
        output.narrow(0, rows[0], rows[1]).add_(b(args[0].narrow(0, rows[0], rows[1]), cache), alpha=b.scale)
        return output

    handles = []
    try:
        for b in branches or ():
            handles.append(b.module.register_forward_hook(lambda module, args, output, b=b: add(module, args, output, b)))
        yield
    finally:
        for h in handles:
            h.remove()


# The host's TorchCompileModel (comfy_api.torch_helpers.set_torch_compile_wrapper): an
# APPLY_MODEL wrapper under this key, and its torch.compile arguments in model_options.
HOST_COMPILE_KEY = "torch.compile"
HOST_COMPILE_KWARGS = "torch_compile_kwargs"


def compiled_reason(*patchers) -> str | None:
    """Why the LoRA adapters' forward hooks could go unseen (None if they cannot): a compiled UNet.
    Dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards), so a
    graph it traced for a call without the hooks (the base's rows, a plain KSampler of the same
    shape) would be reused for the domain's call with the LoRA silently left out."""
    for patcher in patchers:
        options = patcher.model_options
        sources = (getattr(patcher, "wrappers", {}), options.get("transformer_options", {}).get("wrappers", {}))
        wrapper_keys = {key for wrappers in sources for kind in wrappers.values() for key, fns in kind.items() if fns}
        if options.get(HOST_COMPILE_KWARGS) or any("compile" in str(key).lower() for key in wrapper_keys):
            return "the model is compiled (torch.compile wrapper)"
    for m in patchers[0].model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule":
            return "a module of the model is compiled"
    return None

