"""One batch's denoising loss (the step's, noise.py's objective): the host's conditioning expanded
to the batch, x0 noised to x_t, the prediction under autocast against its target."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .config import autocast_dtype
from .noise import DiscreteSchedule, FlowSchedule, predicted_loss
from .plan import Batch


def _batch_cond(cond: Mapping[str, torch.Tensor], batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The host's conditioning ([1, ...] or [B, ...] per key) expanded to the batch, on device;
    plain numbers (e.g. a token count) passed as they are."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
            continue
        if not isinstance(v, torch.Tensor) or v.shape[0] not in (1, batch_size):
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"cond_for returned {k!r} = {got}; expected a tensor with batch size 1 or {batch_size}")
        out[k] = v.detach().to(device).expand(batch_size, *v.shape[1:])
    return out


def denoising_step(model: nn.Module, batch: Batch, cond: Mapping[str, torch.Tensor],
                   schedule: DiscreteSchedule | FlowSchedule, precision: str, device: torch.device) -> torch.Tensor:
    """The loss of one batch: noise x0 to x_t (DDPM eq. 4, or rectified flow's), predict under
    autocast, MSE to the target (noise.py)."""
    x_t, timestep, target = noised(batch, schedule, device)
    return predicted_loss(model, x_t, timestep, target, cond, autocast_dtype(precision))


def noised(batch: Batch, schedule: DiscreteSchedule | FlowSchedule, device: torch.device):
    """(x_t, the model's timestep input, the target) of a batch, on the device."""
    x0, eps = batch.x0.to(device), batch.eps.to(device)  # [B, C, h, w]
    return schedule.noised(x0, eps, batch.t)
