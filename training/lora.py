"""LoRA adapters on a UNet's Linear and Conv2d layers, in ComfyUI's LoRA file format.

An adapted layer computes  base(x) + (alpha / rank) * up(down(x)),  i.e. its weight becomes
    W + (alpha / rank) * up.flatten(1) @ down.flatten(1)   (reshaped to W's shape)
which is how ComfyUI's LoraLoader applies `<key>.lora_up.weight`, `<key>.lora_down.weight`
and `<key>.alpha`. For a conv, down has the base's kernel, stride and padding and up is 1x1.
down starts Kaiming-uniform, up at zero, so a fresh adapter changes nothing.

The base layer is not replaced: it stays in place, with its class, attributes and state-dict
keys (ComfyUI's ops classes subclass nn.Linear / nn.Conv2d and carry their own attributes);
a forward hook adds the adapter's output. `LoRANetwork.remove()` takes the hooks off again.

Under autocast two things keep the adapters' own cost down (issue 16's profile of LoRA training):
- one cast of a layer's input for the layer and its adapter (and for the next adapted layers that
  take the same tensor: q, k and v of a self-attention): autocast would cast it, and cast its
  gradient back, once per matmul, and the UNet's norms hand float32 to most adapted layers;
- a Linear adapter's up-projection adds onto the layer's output inside its matmul (addmm), not as
  a separate pass over the layer-sized output.
"""
from __future__ import annotations

import fnmatch
import math
import weakref
from typing import Mapping, Sequence

import torch
from torch import nn

# Attention projections, the transformer's in/out projections and its feed-forward layers.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.*")
KEY_PREFIX = "diffusion_model."  # ComfyUI maps diffusion_model.<path> to the UNet's <path>.weight


def matches_target(path: str, targets: Sequence[str]) -> bool:
    """True if a trailing run of the dotted module path matches a target (fnmatch wildcards)."""
    return any(fnmatch.fnmatchcase("." + path, "*." + t) for t in targets)


class LoRAAdapter(nn.Module):
    """The low-rank branch (alpha / rank) * up(down(x)) for one Linear or Conv2d."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"LoRA: grouped convolutions (groups={base.groups}) are not supported")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False, padding_mode=base.padding_mode)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            raise TypeError(f"LoRA: {type(base).__name__} is neither a Linear nor a Conv2d")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under autocast the input goes in as it is (autocast casts it for the matmul; a float32 copy
        first would be one more pass over the activation), and the scale multiplies the rank-r
        tensor, not the layer-sized output: each adapted layer adds two matmuls and one add."""
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)
        return self.lora_up(self.lora_down(x) * self.scale)


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """ComfyUI's merge: W + (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape), rank = down.shape[0]."""
    delta = up.flatten(1).float() @ down.flatten(1).float()
    return weight + (alpha / down.shape[0]) * delta.reshape(weight.shape).to(weight.dtype)


class LoRANetwork(nn.Module):
    """The adapters injected into one UNet, by module path; holds the hooks that apply them."""

    def __init__(self, paths: list[str], adapters: list[LoRAAdapter]):
        super().__init__()
        self.paths = paths
        self.adapters = nn.ModuleList(adapters)
        self._handles: list = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    def attach(self, unet: nn.Module) -> None:
        """Freeze the UNet's own parameters and hook the adapters onto their layers."""
        self._frozen = [(p, p.requires_grad) for p in unet.parameters()]
        unet.requires_grad_(False)
        modules = dict(unet.named_modules())
        shared = SharedCast()
        for path, adapter in zip(self.paths, self.adapters):
            self._handles.append(modules[path].register_forward_pre_hook(shared))
            self._handles.append(modules[path].register_forward_hook(_adapter_hook(adapter)))

    def remove(self) -> None:
        """Take the adapters off the UNet and restore its requires_grad flags: it is as before."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen.clear()

    def named_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors under their LoRA-file keys, in a fixed order."""
        out = {}
        for path, adapter in zip(self.paths, self.adapters):
            out[f"{KEY_PREFIX}{path}.lora_down.weight"] = adapter.lora_down.weight
            out[f"{KEY_PREFIX}{path}.lora_up.weight"] = adapter.lora_up.weight
        return out

    def alphas(self) -> dict[str, torch.Tensor]:
        return {f"{KEY_PREFIX}{p}.alpha": torch.tensor(a.alpha) for p, a in zip(self.paths, self.adapters)}


class SharedCast:
    """Forward pre-hook: a floating input goes into an adapted layer already cast to autocast's dtype,
    the cast the layer's matmul would make, made once for the layer, its adapter and every later
    adapted layer handed the same tensor unchanged (the last input seen, held by weak references,
    with its version: a tensor changed in place since is cast again)."""

    def __init__(self):
        self._last: tuple[weakref.ref, int | None, weakref.ref] | None = None

    def __call__(self, module, args):
        x = args[0]
        kind = x.device.type
        if not (torch.is_autocast_enabled(kind) and x.is_floating_point()):
            return None
        dtype = torch.get_autocast_dtype(kind)
        if x.dtype == dtype:
            return None
        version = None if x.is_inference() else x._version  # (inference tensors cannot change in place here)
        src, src_version, cast = (self._last[0](), self._last[1], self._last[2]()) if self._last else (None, None, None)
        if src is not x or src_version != version or cast is None:
            cast = x.to(dtype)
            self._last = (weakref.ref(x), version, weakref.ref(cast))
        return (cast, *args[1:])


def _adapter_hook(adapter: LoRAAdapter):
    linear = isinstance(adapter.lora_up, nn.Linear)

    def hook(module, args, output):
        x = args[0]
        kind = x.device.type
        if linear and torch.is_autocast_enabled(kind) and output.dtype == torch.get_autocast_dtype(kind) and output.is_contiguous():
            h = adapter.lora_down(x)  # [..., rank]
            out = torch.addmm(output.flatten(0, -2), h.flatten(0, -2), adapter.lora_up.weight.t(), alpha=adapter.scale)
            return out.view(output.shape)
        return output + adapter(x).to(output.dtype)
    return hook


def inject_lora(
    unet: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> LoRANetwork:
    """Put a LoRA adapter on every nn.Linear / nn.Conv2d (subclasses included) whose path matches
    `targets`, freeze the UNet's own parameters, and return the adapters (trainable, float32).

    The adapters' initial values depend only on `seed`. Raises ValueError naming the targets if
    nothing matches.
    """
    if rank < 1:
        raise ValueError(f"lora_rank={rank}; expected an integer >= 1")
    generator = torch.Generator().manual_seed(seed)
    paths, adapters = [], []
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and matches_target(path, targets):
            adapter = LoRAAdapter(module, rank, alpha, generator)  # built on CPU: same init on any device
            paths.append(path)
            adapters.append(adapter.to(module.weight.device))
    if not paths:
        raise ValueError(f"LoRA targets {list(targets)} match no Linear or Conv2d layer of the UNet")
    network = LoRANetwork(paths, adapters)
    network.attach(unet)
    return network


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
