"""The paper's guided prediction, one term at a time.

Notation (per sampling step, all tensors shaped like the latent x: [B, C, H, W]):
    u = base(x, "")         the base model's unconditional prediction (the empty prompt)
    c = base(x, positive)   the base model's text-conditioned prediction
    n = base(x, negative)   the base model's negative-prompt prediction
    d = domain(x, "")       a text-free domain model's prediction

Paper, eq. (multi-guidance): eps = u + sum_i w_i * (eps_i - u), where each term i is the
difference between one condition's prediction and the base's unconditional. Here the text
term keeps KSampler's negative-prompt semantics exactly:

    eps = u + cfg * (c - u) - (cfg - 1) * (n - u) + sum_k w_k * (d_k - u)
        = [n + cfg * (c - n)] + sum_k w_k * (d_k - u)

so with every domain weight 0 it is KSampler's classifier-free guidance for any negative,
and when the negative is the empty prompt (n = u) it is the paper's formula verbatim.

A speed dial below that (opt-in, not in the paper): the domain difference d_k - u computed on
every k-th model evaluation only, and reused in between (add_domain_differences); the steps in
between cost KSampler's two rows. k = 1 is the exact formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class GuidanceTerm:
    """One additive term `weight * (prediction - u)` of the multi-guidance sum."""

    prediction: torch.Tensor  # [B, C, H, W]
    weight: float


def ksampler_cfg(cond: torch.Tensor, negative: torch.Tensor, cfg: float) -> torch.Tensor:
    """KSampler's classifier-free guidance: n + cfg * (c - n), in KSampler's operation order."""
    return negative + (cond - negative) * cfg


def text_term(cond: torch.Tensor, negative: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """The text (control) term measured against the base's unconditional u:

    cfg * (c - u) - (cfg - 1) * (n - u).  Added to u it gives ksampler_cfg(c, n, cfg).
    """
    return cfg * (cond - uncond) - (cfg - 1.0) * (negative - uncond)


def domain_term(domain: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """The domain term w_d * (d - u): a text-free domain model against the base's empty prompt."""
    return weight * (domain - uncond)


def add_domain_terms(guided: torch.Tensor, uncond: torch.Tensor, terms: Sequence[GuidanceTerm]) -> torch.Tensor:
    """guided + sum_k w_k (d_k - u): the domain terms on top of any text guidance.

    Terms with weight 0 are skipped, not multiplied by zero, so all-zero weights return
    `guided` itself (bit for bit).
    """
    out = guided
    for term in terms:
        if term.weight != 0.0:
            out = out + domain_term(term.prediction, uncond, term.weight)
    return out


def add_domain_differences(guided: torch.Tensor, differences: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """guided + sum_k w_k delta_k with each delta_k = d_k - u as computed at an earlier evaluation
    (the speed dial: see module doc). Weight-0 terms are skipped, as in add_domain_terms."""
    out = guided
    for delta, weight in differences:
        if weight != 0.0:
            out = out + weight * delta
    return out


def check_domain_every(every: int) -> int:
    """Check the speed dial's k (domain_every) and return it unchanged: ValueError below 1."""
    if every < 1:
        raise ValueError(f"domain_every={every}: must be 1 (every evaluation, exact) or more")
    return every


def recompute_domain(evaluation: int, every: int) -> bool:
    """True if the domain rows are computed at this model evaluation of the run (0, k, 2k, ...);
    ValueError for a k below 1 (check_domain_every)."""
    return evaluation % check_domain_every(every) == 0


def decoupled_guidance(
    uncond: torch.Tensor,
    cond: torch.Tensor | None,
    negative: torch.Tensor | None,
    cfg: float,
    terms: Sequence[GuidanceTerm] = (),
) -> torch.Tensor:
    """The full guided prediction  [n + cfg (c - n)] + sum_k w_k (d_k - u).

    negative None means the negative is the empty prompt (n = u, one row serves both).
    cond None is allowed only for cfg == 0, where KSampler's result is n alone. The text part
    uses KSampler's own operation order, so all-zero domain weights reproduce KSampler.
    """
    n = uncond if negative is None else negative
    if cond is None:
        if cfg != 0.0:
            raise ValueError(f"cfg={cfg} needs the positive prediction; only cfg 0 may omit it")
        text_guided = n
    else:
        text_guided = ksampler_cfg(cond, n, cfg)  # == u + text_term(c, n, u, cfg)
    return add_domain_terms(text_guided, uncond, terms)
