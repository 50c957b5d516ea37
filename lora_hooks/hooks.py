"""The branch up(down(x)) and the forward hooks that add it to a layer's output: for a fixed LoRA
within one call (sampling: lora_applied, with its `rows`), for trainable adapters for a run
(training: SharedCast and adapter_hook). The package docstring tells the mechanism."""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LoraBranch:
    """A fixed LoRA on one Linear or Conv2d: scale * up(down(x)) added to `module`'s output."""

    module: nn.Module
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    scale: float  # strength * alpha / rank

    def __call__(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """up(down(x)) (unscaled), with down and up cast to x's device and dtype once per `cache`."""
        key = (id(self), x.device, x.dtype)
        if key not in cache:
            cache[key] = (self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype))
        down, up = cache[key]
        return branch(x, down, up, self.module)


class RowsMismatch(RuntimeError):
    """A module saw another batch than the call's: its rows are not the call's rows (lora_applied)."""


@contextlib.contextmanager
def lora_applied(branches: list[LoraBranch] | None, cache: dict, rows: tuple[int, int] | None = None, batch: int = 0):
    """Forward hooks adding each branch to its module's output, removed on exit. `rows` = (start,
    count): only to those rows of a call on `batch` rows (a LoRA domain's rows in the base's call,
    nodes/sampling/lora_rows_in_base_call.py); a module whose input has another batch raises RowsMismatch."""
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
