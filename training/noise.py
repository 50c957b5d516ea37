"""The objective: the ordinary denoising loss, on the empty prompt, for the base's schedule.

With a_t = alphas_cumprod[t] (the host's schedule, T = len(alphas_cumprod), t ~ U{0..T-1}):

    DDPM (Ho et al. 2020), eq. 4:    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,   eps ~ N(0, I)
    DDPM eq. 14 (L_simple):          loss = || eps - model(x_t, t) ||^2
    v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4):
                                     v = sqrt(a_t) eps - sqrt(1 - a_t) x_0,  loss = || v - model(x_t, t) ||^2

Rectified flow (SD3, Flux, Z-Image; Esser et al. 2024, "Scaling Rectified Flow Transformers",
eq. 1 and sec. 3.1), with sigma in (0, 1):
                                     x_t = (1 - sigma) x_0 + sigma eps,   loss = || (eps - x_0) - model(x_t, t(sigma)) ||^2
    sigma = shift(u), u ~ logit-normal(0, 1) (their sec. 3.1, "lognorm(0.00, 1.00)"), shift the
    base's own resolution shift (the host's model_sampling: sigma(timestep(u))); the model's
    timestep input t(sigma) likewise (sigma x 1000 for SD3, sigma for Flux and Z-Image).

The paper (Cao et al.) trains the domain UNet with the DDPM loss, every sample conditioned on the
empty-prompt embedding; flow models get the same recipe with their own objective. All functions
are per sample: a_t and sigma have shape [B], x_0 and eps [B, ...].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

PREDICTION_TYPES = ("eps", "v", "flow")


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


def flow_sample(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow's forward process: x_t = (1 - sigma) x0 + sigma eps.  sigma: [B]."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity a flow model predicts: eps - x0 (the host's CONST: x0 = x_t - sigma * output)."""
    return eps - x0


@dataclass(frozen=True)
class DiscreteSchedule:
    """DDPM's discrete timesteps t in 0..T-1 on alphas_cumprod [T]; eps or v targets."""

    alphas_cumprod: torch.Tensor  # float64, CPU
    prediction_type: str  # "eps" or "v"

    def draw(self, g: torch.Generator, b: int) -> torch.Tensor:
        """b timesteps t ~ U{0..T-1} (int64)."""
        return torch.randint(len(self.alphas_cumprod), (b,), generator=g)

    def noised(self, x0, eps, t):
        """(x_t, the model's timestep input, the target) for timesteps t (on x0's device)."""
        a_t = self.alphas_cumprod[t.cpu()].to(x0.device, torch.float32)
        return q_sample(x0, eps, a_t), t.to(x0.device, torch.float32), prediction_target(x0, eps, a_t, self.prediction_type)

    @property
    def id(self) -> str:
        import hashlib

        return hashlib.sha256(self.alphas_cumprod.detach().double().cpu().numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: sigma = shift(u), u ~ logit-normal(0, 1); the velocity target (module doc)."""

    sigma: Callable[[torch.Tensor], torch.Tensor]  # u in (0, 1) -> sigma (the base's shift), [B] float
    timestep: Callable[[torch.Tensor], torch.Tensor]  # sigma -> the model's timestep input
    name: str  # what a resumed run must agree on, e.g. "ModelSamplingDiscreteFlow shift=3.0 multiplier=1000"
    prediction_type: str = "flow"

    def draw(self, g: torch.Generator, b: int) -> torch.Tensor:
        """b values u = sigmoid(n), n ~ N(0, 1) (float32)."""
        return torch.sigmoid(torch.randn(b, generator=g))

    def noised(self, x0, eps, u):
        sigma = self.sigma(u.double().cpu()).to(x0.device, torch.float32)
        return flow_sample(x0, eps, sigma), self.timestep(sigma).to(x0.device, torch.float32), flow_target(x0, eps)

    @property
    def id(self) -> str:
        return self.name


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in float32 whatever the autocast dtype of the prediction."""
    return F.mse_loss(prediction.float(), target.float())


def prediction(model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, torch.Tensor],
               dtype: torch.dtype | None, cache: bool = True) -> torch.Tensor:
    """The model's raw output for x_t under autocast (dtype None: none), refused unless shaped like
    x_t. `cache`: autocast's weight-cast cache, which a CUDA graph capture must not use."""
    with torch.autocast(x_t.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=cache):
        out = model(x_t, timestep, **cond)
    if out.shape != x_t.shape:
        raise ValueError(f"the UNet returned {list(out.shape)} for input {list(x_t.shape)}; "
                         f"expected the raw model output, shaped like x")
    return out


def predicted_loss(model: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, target: torch.Tensor,
                   cond: Mapping[str, torch.Tensor], dtype: torch.dtype | None, cache: bool = True) -> torch.Tensor:
    """The model's prediction under autocast (dtype None: none) and its loss to the target. `cache`:
    autocast's weight-cast cache, which a CUDA graph capture must not use."""
    return denoising_loss(prediction(model, x_t, timestep, cond, dtype, cache), target)


def check_schedule(alphas_cumprod: torch.Tensor, prediction_type: str, flow: FlowSchedule | None = None) -> None:
    """Raise ValueError naming the input unless it is a usable schedule and prediction type."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if prediction_type == "flow":
        if not isinstance(flow, FlowSchedule):
            raise ValueError("flow: prediction_type 'flow' needs a FlowSchedule (the base's sigma shift and timestep)")
        return
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.dim() != 1 or len(alphas_cumprod) == 0:
        raise ValueError("alphas_cumprod: expected a 1-D tensor with one entry per training timestep (e.g. [1000])")
    if not bool(((alphas_cumprod >= 0) & (alphas_cumprod <= 1)).all()):
        raise ValueError("alphas_cumprod: every entry must lie in [0, 1] (cumulative products of 1 - beta)")
