"""The batch plan: which images each step trains on, and the step's flips, timesteps and noise.

Which images a step trains on comes from the epoch's plan: each epoch every image once, each
bucket's images in a random order cut into batches, the batches of all buckets shuffled, from a
generator seeded from (seed, epoch) alone; the step's other randomness (flips, t, eps) from
(seed, step) alone. So a run resumed from its state file at step k ends with the same weights as
a run that was never stopped. Step numbers count optimizer updates: step s is the s-th.

Under torchrun every rank draws the same global batch and takes its slice (Batch.part).
The plan's version is recorded in the state file (config.SAMPLER).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .latents import LatentSet
from .noise import DiscreteSchedule, FlowSchedule


@dataclass(frozen=True)
class Batch:
    bucket: tuple[int, int]  # (height, width) in pixels
    x0: torch.Tensor  # [B, C, h, w] latents (some mirrored)
    t: torch.Tensor  # [B] int64 timesteps in 0..T-1 (a discrete schedule), or u in (0, 1) (a flow schedule)
    eps: torch.Tensor  # [B, C, h, w] noise

    def part(self, rank: int, world: int) -> "Batch":
        """Rank `rank`'s slice of this global batch (batch_size / world images)."""
        if world == 1:
            return self
        n = len(self.t) // world
        s = slice(rank * n, (rank + 1) * n)
        return Batch(self.bucket, self.x0[s], self.t[s], self.eps[s])


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator seeded from `parts` alone (e.g. (seed, step): a step's randomness; (seed,
    "epoch", epoch): an epoch's plan), so every draw is reproducible on resume."""
    digest = hashlib.sha256("|".join(["indomain-train", *map(str, parts)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def bucket_members(data: LatentSet) -> dict[tuple[int, int], list[int]]:
    """The image indices of each bucket (computed once per LatentSet)."""
    if "_by_bucket" not in data.__dict__:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(data.images):
            by_bucket.setdefault(im.bucket, []).append(i)
        data.__dict__["_by_bucket"] = by_bucket
    return data.__dict__["_by_bucket"]


def steps_per_epoch(data: LatentSet, batch_size: int) -> int:
    """How many global batches one epoch has: each bucket's images in batches of batch_size."""
    return sum(-(-len(m) // batch_size) for m in bucket_members(data).values())


def epoch_plan(data: LatentSet, config: TrainConfig, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s global batches (image indices, one bucket each), from (seed, epoch) alone:
    each bucket's images in a random order cut into batches of batch_size, a short last batch
    topped up with other images of its bucket (random; with repeats only where the bucket has
    fewer than batch_size images), then all buckets' batches in a random order. Every image
    appears once per epoch; nothing but the images' buckets is read."""
    cache = data.__dict__.setdefault("_plans", {})  # the current epoch's plan (a frozen dataclass: no setattr)
    key = (config.seed, config.batch_size, epoch)
    if key in cache:
        return cache[key]
    g = seeded_generator(config.seed, "epoch", epoch)
    by_bucket = bucket_members(data)
    b, batches = config.batch_size, []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
        for k in range(0, len(order), b):
            chunk = order[k:k + b]
            if len(chunk) < b:
                taken = set(chunk)
                rest = [m for m in order if m not in taken]
                if len(rest) >= b - len(chunk):
                    chunk += [rest[i] for i in torch.randperm(len(rest), generator=g)[:b - len(chunk)].tolist()]
                else:
                    chunk += [members[i] for i in torch.randint(len(members), (b - len(chunk),), generator=g).tolist()]
            batches.append(chunk)
    plan = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    cache.clear()
    cache[key] = plan
    return plan


def sample_batch(data: LatentSet, step: int, config: TrainConfig, schedule: DiscreteSchedule | FlowSchedule | int) -> Batch:
    """Step `step`'s global batch: its images from the epoch plan (epoch_plan: one bucket, each
    image once per epoch), then flips, timesteps and noise from seeded_generator(seed, step). Only
    these images' latents are read. All on CPU. schedule: what draws the timesteps (an int T: a
    discrete schedule's t ~ U{0..T-1}).
    """
    if isinstance(schedule, int):
        schedule = DiscreteSchedule(torch.zeros(schedule, dtype=torch.float64), "eps")
    per_epoch = steps_per_epoch(data, config.batch_size)
    picks = epoch_plan(data, config, (step - 1) // per_epoch)[(step - 1) % per_epoch]
    images, b = data.images, config.batch_size
    g = seeded_generator(config.seed, step)
    # The draws that picked a step's images before the epoch plan (0.3.0), made and dropped: a seed's
    # flips, timesteps and noise stay those of earlier versions.
    old_bucket = images[int(torch.randint(len(images), (1,), generator=g))].bucket
    n = len(bucket_members(data)[old_bucket])
    torch.randperm(n, generator=g) if n >= b else torch.randint(n, (b,), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    x0 = torch.stack([images[i].flipped if (config.flip and bool(f)) else images[i].latent for i, f in zip(picks, flips)])
    t = schedule.draw(g, b)
    eps = torch.randn(x0.shape, generator=g)
    return Batch(images[picks[0]].bucket, x0, t, eps)
