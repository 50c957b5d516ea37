"""A LoRA from a full copy: the difference of two state dicts of one architecture, W_domain - W_base,
as the LoRA file content that files.py describes (and ComfyUI's LoraLoader merges).

Each weight of two or more dimensions (a Linear's, a Conv's: flattened to out x in*kernel) becomes
its best rank-r approximation in the Frobenius norm, the truncated SVD  U_r S_r V_r^T  (Eckart-Young),
as up = U_r sqrt(S_r) and down = sqrt(S_r) V_r^T with alpha = r (scale 1). A layer whose smaller side
is r or less is stored at its full rank, exactly. The other tensors that differ (norm weights, biases,
other parameters) have no low-rank form: with `others` they are stored whole as `.diff` / `.diff_b`
patches (which ComfyUI applies as W + diff), else left out and counted in the error.

Pure torch: nothing here imports ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .files import KEY_PREFIX


@dataclass
class Extraction:
    """The LoRA's tensors and how far they are from the difference they stand for.

    layer_errors: per low-rank layer (its key without `.weight`), ||D - up @ down|| / ||D|| (Frobenius,
    the stored tensors in their stored dtype); total_error: the same over every tensor that differs,
    ||all residuals|| / ||all differences|| (a left-out tensor's residual is its whole difference);
    left_out: the differing tensors not stored (others=False) with their share ||D_k|| / ||all D||;
    ranks: the rank each layer was stored at."""

    tensors: dict[str, torch.Tensor]
    layer_errors: dict[str, float]
    total_error: float
    left_out: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of the truncated SVD of `delta` (a weight difference of >= 2 dimensions) at
    min(rank, out, in * kernel), float32: up is (out, r, 1, ...), down (r, *delta.shape[1:]), and
    up.flatten(1) @ down.flatten(1) is the best rank-r approximation of delta.flatten(1). The SVD runs
    in float64, where the difference is."""
    matrix = delta.flatten(1).double()  # float64: in float32 a GPU left ~1e-4 of the difference at full rank
    r = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    up = (u[:, :r] * root).reshape(delta.shape[0], r, *([1] * (delta.ndim - 2)))
    down = (root[:, None] * vh[:r]).reshape(r, *delta.shape[1:])
    return up.float(), down.float()


def extract_lora(base: Mapping[str, torch.Tensor], domain: Mapping[str, torch.Tensor], rank: int, *,
                 dtype: torch.dtype = torch.float16, others: bool = False, device: torch.device | str | None = None,
                 prefix: str = KEY_PREFIX, progress: Callable[[int, int], None] | None = None) -> Extraction:
    """The LoRA of domain - base (state dicts with the same keys and shapes) at `rank`, its tensors in
    `dtype` on the CPU under `prefix` + the layer's key. Computed one tensor at a time on `device`
    (default: where the tensors are); progress(done, total) between tensors. ValueError for a rank below 1, keys or shapes that differ, or a
    domain equal to the base."""
    if rank < 1:
        raise ValueError(f"rank {rank} must be 1 or more")
    missing, extra = sorted(set(base) - set(domain)), sorted(set(domain) - set(base))
    if missing or extra:
        raise ValueError(f"the domain's weights are not the base's: missing {missing[:3]}, extra {extra[:3]} "
                         f"({len(missing)} missing, {len(extra)} extra)")
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    norms: dict[str, float] = {}  # ||D_k||^2 of every differing tensor
    residual = 0.0  # sum of ||residual_k||^2
    keys = sorted(base)
    for done, key in enumerate(keys):
        if progress is not None:
            progress(done, len(keys))
        b, d = base[key], domain[key]
        if b.shape != d.shape:
            raise ValueError(f"the domain's {key} has shape {list(d.shape)}, the base's {list(b.shape)}")
        if not b.is_floating_point():
            continue
        delta = d.to(device or d.device, torch.float32) - b.to(device or d.device, torch.float32)
        square = float(delta.square().sum())
        if square == 0.0:
            continue
        norms[key] = square
        if delta.ndim >= 2 and key.endswith(".weight"):
            layer = key[: -len(".weight")]
            up, down = (t.to(dtype) for t in low_rank(delta, rank))
            left = delta.flatten(1).double() - up.flatten(1).double() @ down.flatten(1).double()  # (no TF32 in float64)
            layer_residual = float(left.square().sum())
            errors[layer] = math.sqrt(layer_residual / square)
            ranks[layer] = down.shape[0]
            tensors[f"{prefix}{layer}.lora_up.weight"] = up.cpu().contiguous()
            tensors[f"{prefix}{layer}.lora_down.weight"] = down.cpu().contiguous()
            tensors[f"{prefix}{layer}.alpha"] = torch.tensor(float(down.shape[0]))
            residual += layer_residual
        elif others:
            stored = delta.to(dtype)
            residual += float((delta - stored.float()).square().sum())
            if key.endswith(".bias"):
                name = f"{prefix}{key[: -len('.bias')]}.diff_b"
            else:
                name = f"{prefix}{key[: -len('.weight')] if key.endswith('.weight') else key}.diff"
            tensors[name] = stored.cpu().contiguous()
        else:
            residual += square
    if progress is not None:
        progress(len(keys), len(keys))
    if not norms:
        raise ValueError("the domain's weights equal the base's: there is no difference to extract")
    total = sum(norms.values())
    left_out = {} if others else {k: math.sqrt(v / total) for k, v in norms.items()
                                  if not (k.endswith(".weight") and k[: -len(".weight")] in errors)}
    return Extraction(tensors, errors, math.sqrt(residual / total), left_out, ranks)
