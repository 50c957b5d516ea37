"""A LoRA domain as per-module adapters on the base's own modules: the host's side.

A LoRA domain (a clone of the base with LoRA patches) runs on the base's modules, its LoRA added
per module as scale * up(down(x)) by forward hooks that exist only inside the domain's call
(lora_hooks.lora_applied, the pack's one LoRA mechanism): no second copy of the weights and no weight
swap per step. Here the host's weight patches become those branches (lora_branches). Patches
other than plain LoRA (LoHa, LoKr, DoRA, ...) keep the host's weight-hook path (lora_branches
gives None). A compiled UNet keeps it too: torch.compile does not see forward hooks added after
it traced a module (compiled_reason).
"""
from __future__ import annotations

import torch

import comfy.utils

from ...lora_hooks import LoraBranch


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

