"""The branch up(down(x)) and the forward hooks that add it to a layer's output, for trainable
adapters for a run (training: SharedCast and adapter_hook). The package docstring tells the mechanism."""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def branch(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, conv: nn.Module, inner_scale: float | None = None) -> torch.Tensor:
    """up(down(x)) of one Linear's or Conv2d's LoRA. A 4-d down is a convolution with torch's Conv2d
    code and the geometry of `conv` (stride, padding, padding mode, dilation: the base's, or a Conv2d
    made with it), its kernel down's own; a 4-d up is a 1x1 convolution; 2-d ones are x @ w.T.
    `inner_scale` multiplies the rank-r tensor between the two."""
    h = nn.Conv2d._conv_forward(conv, x, down, None) if down.ndim == 4 else F.linear(x, down)
    if inner_scale is not None:
        h = h * inner_scale
    return F.conv2d(h, up) if up.ndim == 4 else F.linear(h, up)


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


def adapter_hook(adapter: nn.Module):
    """Forward hook adding a trainable adapter (adapters.LoRAAdapter) to its layer's output. Under
    autocast, for a Linear whose output is in autocast's dtype, the up-projection adds onto the
    output inside its matmul: addmm(output, down(x), up.T, alpha=scale)."""
    linear = adapter.lora_up.weight.ndim == 2

    def hook(module, args, output):
        x = args[0]
        kind = x.device.type
        if linear and torch.is_autocast_enabled(kind) and output.dtype == torch.get_autocast_dtype(kind) and output.is_contiguous():
            h = F.linear(x, adapter.lora_down.weight)  # [..., rank]
            out = torch.addmm(output.flatten(0, -2), h.flatten(0, -2), adapter.lora_up.weight.t(), alpha=adapter.scale)
            return out.view(output.shape)
        return output + adapter(x).to(output.dtype)
    return hook
