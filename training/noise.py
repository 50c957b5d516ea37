"""The objective: the ordinary denoising loss, on the empty prompt.

With a_t = alphas_cumprod[t] (the host's schedule, T = len(alphas_cumprod), t ~ U{0..T-1}):

    DDPM (Ho et al. 2020), eq. 4:    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,   eps ~ N(0, I)
    DDPM eq. 14 (L_simple):          loss = || eps - model(x_t, t) ||^2
    v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4):
                                     v = sqrt(a_t) eps - sqrt(1 - a_t) x_0,  loss = || v - model(x_t, t) ||^2

The paper (Cao et al.) trains the domain UNet with exactly this loss, every sample conditioned on
the empty-prompt embedding. All functions are per sample: a_t has shape [B], x_0 and eps [B, ...].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("eps", "v")


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`."""
    return a.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 4: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps.  x0, eps: [B, C, h, w]; a_t: [B]."""
    a = _per_sample(a_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def v_target(x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho's velocity: v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
    a = _per_sample(a_t, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def prediction_target(x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the model must predict: eps (DDPM eq. 14) or v."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "v":
        return v_target(x0, eps, a_t)
    raise ValueError(f"prediction_type={prediction_type!r}; expected one of {PREDICTION_TYPES}")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in float32 whatever the autocast dtype of the prediction."""
    return F.mse_loss(prediction.float(), target.float())


def check_schedule(alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
    """Raise ValueError naming the input unless it is a usable schedule and prediction type."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 or len(alphas_cumprod) == 0:
        raise ValueError("alphas_cumprod: expected a 1-D tensor with one entry per training timestep (e.g. [1000])")
    if not bool(((alphas_cumprod >= 0) & (alphas_cumprod <= 1)).all()):
        raise ValueError("alphas_cumprod: every entry must lie in [0, 1] (cumulative products of 1 - beta)")
