"""Trainable LoRA adapters on a UNet's Linear and Conv2d layers (training's side of the package
docstring): one LoRAAdapter per targeted layer, hooked onto it by a LoRANetwork."""
from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Sequence

import torch
from torch import nn

from .files import KEY_PREFIX
from .hooks import SharedCast, adapter_hook, branch

# Attention projections, the transformer's in/out projections and its feed-forward layers.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.*")


def matches_target(path: str, targets: Sequence[str]) -> bool:
    """True if a trailing run of the dotted module path matches a target (fnmatch wildcards)."""
    return any(fnmatch.fnmatchcase("." + path, "*." + t) for t in targets)


class LoRAAdapter(nn.Module):
    """The low-rank branch (alpha / rank) * up(down(x)) for one Linear or Conv2d. For a conv,
    lora_down is a Conv2d with the base's kernel, stride, padding, padding mode and dilation (the
    geometry `branch` takes from it) and lora_up a 1x1 Conv2d."""

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
        return branch(x, self.lora_down.weight, self.lora_up.weight, self.lora_down, inner_scale=self.scale)


class LoRANetwork(nn.Module):
    """The adapters injected into one UNet, by module path; holds the hooks that apply them."""

    def __init__(self, paths: list[str], adapters: list[LoRAAdapter]):
        super().__init__()
        self.paths = paths
        self.adapters = nn.ModuleList(adapters)
        self.enabled = True  # False within suspended(): the hooks pass every call through unchanged
        self._handles: list = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    def attach(self, unet: nn.Module) -> None:
        """Freeze the UNet's own parameters and hook the adapters onto their layers."""
        self._frozen = [(p, p.requires_grad) for p in unet.parameters()]
        unet.requires_grad_(False)
        modules = dict(unet.named_modules())
        shared = SharedCast()
        for path, adapter in zip(self.paths, self.adapters):
            self._handles.append(modules[path].register_forward_pre_hook(self._gated(shared)))
            self._handles.append(modules[path].register_forward_hook(self._gated(adapter_hook(adapter))))

    def _gated(self, hook):
        """`hook` while the network is enabled; nothing (the call unchanged) within suspended()."""
        def gated(*args):
            return hook(*args) if self.enabled else None
        return gated

    @contextlib.contextmanager
    def suspended(self):
        """Within the block the UNet computes without the adapters (the base's layers alone, as
        before attach), e.g. to sample the base beside a file of the adapters' weights; the
        adapters, their hooks and the UNet's requires_grad flags stay as they are. A flag, not
        hooks removed and added again: a compiled forward keeps its graph (a guard on the flag)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

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
