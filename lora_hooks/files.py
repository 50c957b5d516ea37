"""ComfyUI's LoRA file format: `diffusion_model.<path>.lora_up.weight`, `.lora_down.weight` and
`.alpha` per adapted layer, and ComfyUI's merge of them into the layer's weight."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from .adapters import LoRANetwork

KEY_PREFIX = "diffusion_model."  # ComfyUI maps diffusion_model.<path> to the UNet's <path>.weight


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """ComfyUI's merge: W + (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape), rank = down.shape[0]."""
    delta = up.flatten(1).float() @ down.flatten(1).float()
    return weight + (alpha / down.shape[0]) * delta.reshape(weight.shape).to(weight.dtype)


def lora_state_dict(network: LoRANetwork, values: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The ComfyUI LoRA file content: diffusion_model.<path>.lora_up.weight / .lora_down.weight / .alpha.

    `values` replaces the adapters' current tensors by key (e.g. their EMA).
    """
    tensors = {k: (values[k] if values is not None else p).detach() for k, p in network.named_params().items()}
    tensors.update(network.alphas())
    return tensors


def load_lora(network: LoRANetwork, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a LoRA file's tensors into the adapters; ValueError naming missing, extra or misfit keys."""
    expected = {**network.named_params(), **network.alphas()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ValueError(f"LoRA does not fit these adapters: missing keys {missing[:5]}, unexpected keys {extra[:5]} "
                         f"(was it trained with another rank, target set or base model?)")
    with torch.no_grad():
        for key, param in network.named_params().items():
            if state_dict[key].shape != param.shape:
                raise ValueError(f"LoRA key {key} has shape {list(state_dict[key].shape)}, the adapter needs {list(param.shape)}")
            param.copy_(state_dict[key])
    for key, alpha in network.alphas().items():
        if float(state_dict[key]) != float(alpha):
            raise ValueError(f"LoRA key {key} is {float(state_dict[key])}, the adapters use alpha {float(alpha)}")
