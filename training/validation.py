"""Validation: a share of the images held out of training, their loss measured at each checkpoint.

Which images (`split`): the share of the set (TrainConfig.validation_share, at least one image and
at least one left to train on) whose names come first in a fixed hash order. The order depends on
the names alone, not on the seed or the other settings, so runs that differ in lr, rank, seed ...
hold out the same images and their numbers compare; adding images to the folder moves few of them.

What is measured (`validation_loss`): the training objective (noise.py) of the weights being
trained (not their EMA), without gradients, under the run's autocast, on each held-out image
(unmirrored) at DRAWS timesteps and noises drawn from a generator seeded by the image's name
alone: the same draws at every checkpoint, after a resume and in every run, so that the numbers
differ only because the weights do. The mean over images and draws is the validation loss.
Under torchrun each rank computes every world-th item and the sums are added (one all_reduce).
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Mapping

import torch
from torch import nn

from .distributed import Ranks, collective_device
from .latents import LatentSet
from .noise import DiscreteSchedule, FlowSchedule, prediction
from .plan import seeded_generator

DRAWS = 4  # (timestep, noise) draws per held-out image


def _order_key(name: str) -> bytes:
    return hashlib.sha256(f"indomain-validation|{name}".encode()).digest()


def held_out_count(n: int, share: float) -> int:
    """How many of n images `share` holds out: round(share * n), at least 1; 0 for share 0."""
    return 0 if share <= 0 else max(1, round(share * n))


def split(data: LatentSet, share: float) -> tuple[LatentSet, list]:
    """(the training set, the held-out images in the set's order). share 0: (data, []).
    ValueError when the share leaves no image to train on."""
    count = held_out_count(len(data.images), share)
    if count == 0:
        return data, []
    if count >= len(data.images):
        raise ValueError(f"validation_share={share} holds out {count} of the {len(data.images)} images and leaves none to "
                         f"train on; lower it, or add images")
    ranked = sorted(range(len(data.images)), key=lambda i: (_order_key(data.images[i].name), i))
    held = set(ranked[:count])
    train = [im for i, im in enumerate(data.images) if i not in held]
    return LatentSet(train, data.image_set, data.encoded), [im for i, im in enumerate(data.images) if i in held]


def draws(image, schedule: DiscreteSchedule | FlowSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A held-out image's fixed draws: (its latent [C, h, w], t [DRAWS], eps [DRAWS, C, h, w]), from a
    generator seeded by its name alone (made again at each checkpoint: nothing is kept)."""
    g = seeded_generator("validation", image.name)
    latent = image.latent
    t = schedule.draw(g, DRAWS)
    return latent, t, torch.randn((DRAWS, *latent.shape), generator=g)


@torch.no_grad()
def validation_loss(model: nn.Module, images: list, schedule: DiscreteSchedule | FlowSchedule,
                    cond_for: Callable[[tuple[int, int], int], Mapping[str, torch.Tensor]], dtype: torch.dtype | None,
                    device: torch.device, chunk: int, r: Ranks = Ranks(), even: bool = False) -> float:
    """The mean loss of `model` over every held-out image and draw (module doc). cond_for(bucket, n):
    the conditioning for n samples of that bucket, on the device. `chunk`: samples per forward call
    (the run's micro-batch). Under torchrun a collective: every rank must call it. even: every rank
    makes the same number of forward calls (a sharded model's forward is a collective: FSDP gathers
    its weights), those with fewer repeating a call whose loss is not counted."""
    flat = [(j, d) for j in range(len(images)) for d in range(DRAWS)]
    by_bucket: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k, (j, d) in enumerate(flat):
        if k % r.world == r.rank:  # this rank's share
            by_bucket.setdefault(images[j].bucket, []).append((j, d))
    total = torch.zeros((), dtype=torch.float64)
    calls = sum(-(-len(m) // chunk) for m in by_bucket.values())
    extra = _missing_calls(r, calls) if even else 0
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            drawn = {j: draws(images[j], schedule) for j in dict.fromkeys(j for j, _ in part)}
            x0 = torch.stack([drawn[j][0] for j, _ in part]).to(device)
            t = torch.stack([drawn[j][1][d] for j, d in part])
            eps = torch.stack([drawn[j][2][d] for j, d in part]).to(device)
            x_t, timestep, target = schedule.noised(x0, eps, t)
            losses = per_sample_loss(model, x_t, timestep, target, cond_for(bucket, len(part)), dtype)
            total += losses.double().sum().cpu()
    for _ in range(extra):  # (a rank with no share repeats the first held-out image's first draw)
        x0, t, eps = draws(images[0], schedule)
        x_t, timestep, target = schedule.noised(x0[None].to(device), eps[:1].to(device), t[:1])
        per_sample_loss(model, x_t, timestep, target, cond_for(images[0].bucket, 1), dtype)
    if r.active:
        total = total.to(collective_device())
        torch.distributed.all_reduce(total)
        total = total.cpu()
    return float(total) / len(flat)


def _missing_calls(r: Ranks, calls: int) -> int:
    """How many forward calls this rank makes fewer than the rank with the most."""
    if not r.active:
        return 0
    most = torch.tensor(calls, dtype=torch.int64, device=collective_device())
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most) - calls


def per_sample_loss(model: nn.Module, x_t, timestep, target, cond, dtype) -> torch.Tensor:
    """[B] float32: each sample's mean squared error (the loss of a batch is their mean)."""
    return (prediction(model, x_t, timestep, cond, dtype).float() - target.float()).square().flatten(1).mean(1)


def finite_or_none(value: float) -> float | None:
    """A loss as the state file's JSON records it (None for NaN or infinite)."""
    return value if math.isfinite(value) else None
