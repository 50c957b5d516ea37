"""train(): the domain UNet recipe, stage by stage.

    prepare data -> cache latents -> build trainable -> AdamW -> LR schedule -> steps:
        check_interrupt, sample a batch (one bucket), noise it, loss under autocast, backward,
        refuse a non-finite loss, optimizer step, EMA, progress, checkpoint.

Which images a step trains on comes from the epoch's plan: each epoch every image once, each
bucket's images in a random order cut into batches, the batches of all buckets shuffled, from a
generator seeded from (seed, epoch) alone; the step's other randomness (flips, t, eps) from
(seed, step) alone. So a run resumed from its state file at step k ends with the same weights as
a run that was never stopped. Step numbers count optimizer updates: step s is the s-th.

Under torchrun (a process group, distributed.py) the same global batch is drawn on every rank and
each rank trains on its slice of batch_size / N images, with DistributedDataParallel averaging the
gradients (and, with `shard_optimizer`, ZeroRedundancyOptimizer keeping 1/N of AdamW's moments per
rank): batch_size, lr and steps mean what they mean on one GPU, and a run resumes on any number of
ranks that divides batch_size. Rank 0 alone writes the state file and reports progress.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .checkpoint import check_resume_config, optimizer_state, read_state_header, restore_state, save_state
from .data import ImageSet
from .distributed import Ranks, StoppedByPeer, agree, agree_flag, announce_failure, gather_objects, mark_own, ranks, stopped_by_peer
from .latents import FileIndex, LatentSet, cache_latents
from .lora import DEFAULT_TARGETS
from .noise import DiscreteSchedule, FlowSchedule, check_schedule
from .graphed import GraphedSteps, predicted_loss
from .trainable import MODES, Trainable, ema_decay_at, ema_init, ema_update, enable_gradient_checkpointing, full_copy, lora_adapters

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
# TrainConfig fields that may change between a run and its resumption (they do not change the math).
# options that change speed or bookkeeping, not the math: a run may be resumed with other values
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "preview_every", "gradient_checkpointing", "compile", "shard_optimizer",
                     "cuda_graph")
# Options that change the math of the steps still to run but may change on resume (e.g. a lower lr or
# another precision after a NaN loss): recorded in the state, a change is logged.
ADJUSTABLE_ON_RESUME = ("lr", "lr_schedule", "warmup_steps", "precision")
SAMPLER = "epoch/1"  # how batches are drawn (run_config's "sampler"; states of 0.3.0 have none)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # total optimizer updates (a resumed run continues up to this)
    mode: str = "lora"  # "lora": adapters on the host's UNet; "full": a float32 copy, all parameters
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 1e-4
    weight_decay: float = 1e-2
    lr_schedule: str = "constant"  # or "cosine" (to zero at the end)
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr
    batch_size: int = 1
    resolution: int = 512  # bucket area <= resolution^2
    flip: bool = True  # horizontal-flip augmentation
    seed: int = 0
    precision: str = "bf16"  # autocast dtype: "bf16", "fp16" (with loss scaling) or "fp32"
    ema_decay: float = 0.0  # 0 = no EMA; step t uses min(ema_decay, (1 + t) / (10 + t)) (warm-up)
    checkpoint_every: int = 0  # save the state every N steps (0: only at the end); needs state_path
    preview_every: int = 0  # call on_preview every N steps (0: never)
    gradient_checkpointing: tuple[str, ...] = ()  # UNet submodule paths whose activations are recomputed
    compile: bool = False  # torch.compile the trained module's forward (first steps slow; fuses the small ops)
    shard_optimizer: bool = False  # under torchrun: ZeroRedundancyOptimizer (each rank keeps 1/N of AdamW's state)
    optimizer: str = "adamw"  # or "adamw8bit": bitsandbytes' AdamW8bit (the paper's recipe), optional dependency
    cuda_graph: bool = False  # the steps' forward and backward replayed as CUDA graphs (graphed.py); CUDA, bf16/fp32

    def validate(self) -> None:
        """ValueError naming the first bad field and what it should be."""
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected {expected}")

        need(self.steps >= 1, "steps", "an integer >= 1")
        need(self.mode in MODES, "mode", f"one of {MODES}")
        need(self.lora_rank >= 1, "lora_rank", "an integer >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "a number > 0")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        need(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.resolution >= 64 and self.resolution % 64 == 0, "resolution", "a multiple of 64 (e.g. 512 or 1024)")
        need(self.precision in PRECISIONS, "precision", f"one of {tuple(PRECISIONS)}")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "a number in [0, 1) (0 = no EMA)")
        need(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        need(self.preview_every >= 0, "preview_every", "an integer >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        if self.cuda_graph and (self.precision == "fp16" or self.compile):
            raise ValueError(f"cuda_graph=True with {'precision fp16 (its loss scaling)' if self.precision == 'fp16' else 'compile'}: "
                             "use one or the other (cuda_graph works with bf16 or fp32, not compiled)")
        if self.optimizer == "adamw8bit":
            bitsandbytes_available()  # before anything is read or written
            if self.shard_optimizer:
                raise ValueError("optimizer='adamw8bit' with shard_optimizer: use one or the other (ZeroRedundancyOptimizer "
                                 "does not gather bitsandbytes' 8-bit states)")


@dataclass(frozen=True)
class Progress:
    stage: str  # "cache" (encoding latents: step = images done) or "train" (step = updates done)
    step: int
    total: int
    loss: float | None  # this step's loss (train only)
    images_per_s: float
    eta_s: float


@dataclass
class TrainResult:
    weights: dict[str, torch.Tensor]  # deliverable: full UNet state dict (UNet keys) or ComfyUI LoRA tensors
    ema_weights: dict[str, torch.Tensor] | None  # the same for the EMA weights (None without EMA)
    losses: list[float] = field(default_factory=list)  # one per step run in this call
    step: int = 0  # updates done in total
    start_step: int = 0  # where this call started (the resumed state's step, else 0)


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite; the state file keeps its last good content."""

    def __init__(self, step: int, what: str, state_path: str | None, saved_step: int | None):
        kept = (f"The state file {state_path!r} is unchanged (step {saved_step}); resume from it with a lower lr."
                if saved_step is not None else "No state was saved; start again with a lower lr.")
        super().__init__(f"training diverged at step {step}: {what}. {kept} fp32 or bf16 precision is more stable than fp16.")
        self.step = step


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step) only: every step's randomness, reproducible on resume."""
    digest = hashlib.sha256(f"indomain-train|{seed}|{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def learning_rate(step: int, config: TrainConfig) -> float:
    """The LR of update `step` (1-based): linear warm-up, then constant or cosine down towards 0."""
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps - 1) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


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


def _generator(*parts) -> torch.Generator:
    digest = hashlib.sha256("|".join(["indomain-train", *map(str, parts)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _by_bucket(data: LatentSet) -> dict[tuple[int, int], list[int]]:
    """The image indices of each bucket (computed once per LatentSet)."""
    if "_by_bucket" not in data.__dict__:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(data.images):
            by_bucket.setdefault(im.bucket, []).append(i)
        data.__dict__["_by_bucket"] = by_bucket
    return data.__dict__["_by_bucket"]


def steps_per_epoch(data: LatentSet, batch_size: int) -> int:
    """How many global batches one epoch has: each bucket's images in batches of batch_size."""
    return sum(-(-len(m) // batch_size) for m in _by_bucket(data).values())


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
    g = _generator(config.seed, "epoch", epoch)
    by_bucket = _by_bucket(data)
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
    image once per epoch), then flips, timesteps and noise from step_generator(seed, step). Only
    these images' latents are read. All on CPU. schedule: what draws the timesteps (an int T: a
    discrete schedule's t ~ U{0..T-1}).
    """
    if isinstance(schedule, int):
        schedule = DiscreteSchedule(torch.zeros(schedule, dtype=torch.float64), "eps")
    per_epoch = steps_per_epoch(data, config.batch_size)
    picks = epoch_plan(data, config, (step - 1) // per_epoch)[(step - 1) % per_epoch]
    images, b = data.images, config.batch_size
    g = step_generator(config.seed, step)
    # The draws that picked a step's images before the epoch plan (0.3.0), made and dropped: a seed's
    # flips, timesteps and noise stay those of earlier versions.
    old_bucket = images[int(torch.randint(len(images), (1,), generator=g))].bucket
    n = len(_by_bucket(data)[old_bucket])
    torch.randperm(n, generator=g) if n >= b else torch.randint(n, (b,), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    x0 = torch.stack([images[i].flipped if (config.flip and bool(f)) else images[i].latent for i, f in zip(picks, flips)])
    t = schedule.draw(g, b)
    eps = torch.randn(x0.shape, generator=g)
    return Batch(images[picks[0]].bucket, x0, t, eps)


def run_config(config: TrainConfig, data: LatentSet, vae_id: str, prediction_type: str, unet: nn.Module,
               schedule: DiscreteSchedule | FlowSchedule) -> dict:
    """What a state file must agree on to be resumed: the config's math, the images, the VAE, the base."""
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    if cfg["optimizer"] == "adamw":  # as state files from before the option record it: not at all
        del cfg["optimizer"]
    shapes = hashlib.sha256("".join(f"{k}:{list(v.shape)};" for k, v in unet.state_dict().items()).encode())
    return {
        **cfg,
        "image_set": data.image_set,
        "num_images": len(data.images),
        "vae_id": vae_id,
        "prediction_type": prediction_type,
        "schedule": schedule.id,
        "sampler": SAMPLER,
        "unet_shapes": shapes.hexdigest()[:16],
    }


def bitsandbytes_available() -> None:
    """ImportError naming the package and how to install it, if bitsandbytes cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("optimizer 'adamw8bit' needs the bitsandbytes package, which is not installed: "
                          "pip install bitsandbytes (in the Python that runs ComfyUI), or choose optimizer 'adamw'")


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW: fused kernels on CUDA, foreach elsewhere. sharded (under torchrun): a
    ZeroRedundancyOptimizer, each rank keeping and updating 1/N of the parameters' AdamW state
    (then broadcasting its updated parameters): the same update, N times less optimizer memory.

    optimizer "adamw8bit": bitsandbytes' AdamW8bit, the optimizer of the paper's own recipe
    (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): the same update with
    both moments stored in 8 bits, quantized block by block (2 bytes of state per parameter
    instead of AdamW's 8; tensors under 4096 elements keep 32-bit states)."""
    if config.optimizer == "adamw8bit":  # (TrainConfig.validate has checked that bitsandbytes is there)
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=config.lr,
                                       weight_decay=config.weight_decay, **kind)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **kind)


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


def _check_finite(params: Mapping[str, torch.Tensor], step: int, state_path, saved_step) -> None:
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(step, f"weight {name} is not finite", state_path, saved_step)


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


def autocast_dtype(precision: str) -> torch.dtype | None:
    return None if precision == "fp32" else PRECISIONS[precision]


def cuda_graph_reason(device: torch.device | str) -> str | None:
    """Why this process cannot replay the steps as CUDA graphs on `device` (None: it can); the
    config's own refusals (fp16, compile) are TrainConfig's."""
    device = torch.device(device)
    if device.type != "cuda" or ranks().active:
        return "CUDA graphs need a CUDA device and one process" + (
            f" (the device is {device})" if device.type != "cuda" else " (not under torchrun)")
    return None


def train(
    unet: nn.Module,
    images: str | os.PathLike | torch.Tensor,
    *,
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae_id: str,
    cond_for: Callable[[int, int], Mapping[str, torch.Tensor]],
    alphas_cumprod: torch.Tensor | None,
    prediction_type: str,
    config: TrainConfig,
    cache_dir: str | os.PathLike,
    state_path: str | os.PathLike | None = None,
    check_interrupt: Callable[[], None] = lambda: None,
    on_progress: Callable[[Progress], None] | None = None,
    on_preview: Callable[[int, nn.Module], None] | None = None,
    on_checkpoint: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    device: torch.device | str | None = None,
    flow: FlowSchedule | None = None,
    release_base: Callable[[], None] | None = None,
) -> TrainResult:
    """Train a domain UNet text-free on `images`; the package docstring describes every argument.

    If `state_path` exists it is resumed (its config must match, else ResumeMismatch names the
    keys); if it has already reached config.steps, its weights are returned without training.
    """
    config.validate()
    check_schedule(alphas_cumprod, prediction_type, flow)
    schedule = flow if prediction_type == "flow" else DiscreteSchedule(
        alphas_cumprod.detach().to("cpu", torch.float64), prediction_type)
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    state_path = os.fspath(state_path) if state_path is not None else None
    report = on_progress or (lambda info: None)

    r = ranks()
    if config.batch_size % r.world:
        raise ValueError(f"batch_size={config.batch_size} is the global batch and must be divisible by the {r.world} "
                         f"processes (each trains on batch_size / {r.world}); use a multiple of {r.world}")
    info = log.info if r.main else log.debug  # one report, from rank 0
    if config.cuda_graph and (reason := cuda_graph_reason(device)):
        raise ValueError(f"cuda_graph=True: {reason}")

    # 1. Data: every image fitted to its bucket and encoded once (cached on disk; sharded across ranks).
    image_set = ImageSet(images)
    n = len(image_set)
    unreadable: list[str] | None = [] if r.active else None

    def on_image(done: int, secs: float) -> None:
        if r.main:  # rank 0's share, scaled to the whole set: an estimate under torchrun
            done = min(n, done * r.world)
            report(Progress("cache", done, n, None, done / max(secs, 1e-9), secs / done * (n - done)))

    t_cache = time.monotonic()
    index = FileIndex(cache_dir, vae_id, config.resolution, config.flip)  # unchanged files are not read again
    data = cache_latents(
        image_set.bucketed(config.resolution, shard=(r.rank, r.world), unreadable=unreadable,
                           known=lambda i, signature: index.known(image_set.names[i], i, signature)),
        encode=encode, vae_id=vae_id, cache_dir=cache_dir, flip=config.flip, check_interrupt=check_interrupt,
        on_image=on_image, ranks=r,
    )
    if r.main:
        index.save(data.images)
    if r.active:
        image_set.report_unreadable(sum(gather_objects(r, unreadable), []), warn=r.main)
        if r.main:
            secs = time.monotonic() - t_cache
            report(Progress("cache", len(data.images), n, None, len(data.images) / max(secs, 1e-9), 0.0))
    current = run_config(config, data, vae_id, prediction_type, unet, schedule)
    header = None
    if state_path is not None and os.path.exists(state_path):
        header = read_state_header(state_path)
        if "sampler" not in header.config:  # written by 0.3.0 or earlier: it goes on with the epoch order
            info("%s was written before the epoch order; the run goes on with it", state_path)
            header.config["sampler"] = SAMPLER
        for key, saved, now in check_resume_config(header, current, ADJUSTABLE_ON_RESUME):
            info("Resuming %s with %s %s (saved %s)", state_path, key, now, saved)

    # 2. The trainable (a full copy, or LoRA adapters), AdamW, the fp16 loss scaler, the EMA.
    if config.mode == "full":
        trainable = full_copy(unet)
        if release_base is not None:  # the frozen base is not read again: its memory is the host's to use
            release_base()
    else:
        trainable = lora_adapters(unet, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
    undo_checkpointing, graphed = (lambda: None), None
    try:
        undo_checkpointing = enable_gradient_checkpointing(trainable.module, config.gradient_checkpointing,
                                                           preserve_rng_state=not config.cuda_graph)
        model, params = trainable.module, trainable.params
        forward = data_parallel(trainable, device) if r.active else model  # what the steps call
        if config.compile:
            forward = torch.compile(forward)
            model = forward if not r.active else model
        optimizer = make_optimizer(list(params.values()), config, device, sharded=r.active and config.shard_optimizer)
        scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        ema = ema_init(params) if config.ema_decay > 0 else None
        graphed = GraphedSteps(model, list(params.values()), autocast_dtype(config.precision)) if config.cuda_graph else None
        start = 0 if header is None else header.step
        if header is not None:
            restore_state(header, params=params, ema=ema, optimizer=optimizer, scaler=scaler)
            info("Resuming %s at step %d of %d", state_path, start, config.steps)
        saved_step = header.step if header is not None else None
        conds: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        losses: list[float] = []
        t0 = time.monotonic()
        if start < config.steps:
            info("Training (%s) on %d images in %d buckets, steps %d..%d%s", config.mode, len(data.images),
                 len(_by_bucket(data)), start + 1, config.steps,
                 f", {r.world} processes of {config.batch_size // r.world} images each" if r.active else "")

        # 3. The steps.
        for step in range(start + 1, config.steps + 1):
            stop = _interrupt(check_interrupt, r)
            batch = sample_batch(data, step, config, schedule).part(r.rank, r.world)
            try:
                if batch.bucket not in conds:
                    conds[batch.bucket] = _batch_cond(cond_for(*batch.bucket), len(batch.t), device)
                if graphed is not None:  # forward and backward in one replay; the weights are not touched yet
                    loss = graphed(*noised(batch, schedule, device), conds[batch.bucket])
                else:
                    loss = denoising_step(forward, batch, conds[batch.bucket], schedule, config.precision, device)
                loss_value = loss.item()
                if not r.active and not math.isfinite(loss_value):
                    raise TrainingDiverged(step, f"the loss is {loss_value}", state_path, saved_step)
                if graphed is None:
                    scaler.scale(loss).backward()
                stop = stop or _interrupt(check_interrupt, r)  # before the update: an interrupt never leaves a half-applied step
                status = agree(r, loss_value, stop is not None) if r.active else None  # the same decision on every rank
            except BaseException as e:
                raise _failure(r, e, step) from None

            if status is not None:
                if status.interrupted:
                    raise stop if stop is not None else StoppedByPeer(
                        f"stopped because rank {status.interrupted[0]} was interrupted", interrupted=True)
                if status.nonfinite:
                    bad = ", ".join(f"rank {k}: {status.losses[k]}" for k in status.nonfinite)
                    error = TrainingDiverged(step, f"the loss is not finite ({bad})", state_path, saved_step)
                    raise error if r.main else StoppedByPeer(f"stopped because {error}")
                loss_value = status.loss
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            try:
                scaler.step(optimizer)  # a sharded optimizer broadcasts its parameters: a collective
            except BaseException as e:
                raise _failure(r, e, step) from None
            scaler.update()
            if graphed is None:  # the graphs keep their gradient tensors (zeroed before each step)
                optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, params, ema_decay_at(step, config.ema_decay))
            losses.append(loss_value)

            elapsed, done = time.monotonic() - t0, step - start
            if r.main:
                report(Progress("train", step, config.steps, loss_value, done * config.batch_size / max(elapsed, 1e-9),
                                elapsed / done * (config.steps - step)))
            if state_path is not None and (step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                _check_finite(params, step, state_path, saved_step)  # the same weights on every rank: the same outcome
                try:
                    _save(r, state_path, step, current, params, ema, optimizer, scaler,
                          lambda: on_checkpoint(step, trainable.export(ema if ema is not None else params)) if on_checkpoint else None)
                except BaseException as e:
                    raise _failure(r, e, step) from None
                saved_step = step
            if r.main and on_preview is not None and config.preview_every and step % config.preview_every == 0:
                on_preview(step, model)

        if losses:
            info("Training done at step %d (last loss %.4g)", config.steps, losses[-1])
        return TrainResult(
            weights=trainable.export(params),
            ema_weights=trainable.export(ema) if ema is not None else None,
            losses=losses,
            step=max(start, config.steps),
            start_step=start,
        )
    finally:
        if graphed is not None:
            graphed.close()
        undo_checkpointing()
        trainable.close()


def _interrupt(check_interrupt: Callable[[], None], r: Ranks) -> BaseException | None:
    """check_interrupt(); alone it raises at once, under torchrun its interrupt is returned, to be
    agreed on by every rank at the step's status exchange."""
    if not r.active:
        check_interrupt()
        return None
    try:
        check_interrupt()
    except BaseException as e:
        return e
    return None


def _failure(r: Ranks, error: BaseException, step: int) -> BaseException:
    """What to raise for an exception inside a step: alone, the exception; under torchrun, a
    StoppedByPeer when it comes from another rank's failure, else the exception, announced to the
    other ranks first."""
    if not r.active or isinstance(error, StoppedByPeer) or getattr(error, "indomain_failed_rank", None) is not None:
        return error  # alone; or already decided (another rank's stop, this rank's agreed failure)
    peer = stopped_by_peer(r, error)
    if peer is not None:
        return peer
    announce_failure(r, f"{type(error).__name__} at step {step}: {str(error).splitlines()[0][:300] if str(error) else ''}")
    return mark_own(r, error)


def _save(r: Ranks, state_path: str, step: int, config: dict, params, ema, optimizer, scaler, after) -> None:
    """Rank 0 writes the state (and `after()`: the host's model file); every rank learns whether it
    succeeded, so a failed write stops every rank."""
    by_index = optimizer_state(optimizer, list(params.values()))  # a collective for a sharded optimizer
    failure = None
    if r.main:
        try:
            save_state(state_path, step=step, config=config, params=params, ema=ema, optimizer=by_index, scaler=scaler)
            if after is not None:
                after()
        except BaseException as e:
            if not r.active:
                raise
            failure = mark_own(r, e)
    if r.active and agree_flag(r, failure is not None) and failure is None:
        raise StoppedByPeer(f"stopped because rank 0 could not write the checkpoint at step {step} (its message says why)")
    if failure is not None:
        raise failure


def data_parallel(trainable: Trainable, device: torch.device) -> nn.Module:
    """The trained module under DistributedDataParallel: only the trained parameters are
    synchronized (the host's frozen base weights of a LoRA run are left alone: the same on every
    rank already); gradients are averaged across ranks during backward."""
    from torch.nn.parallel import DistributedDataParallel

    holder = _Trained(trainable.module, trainable.owner)
    trained = {id(p) for p in trainable.params.values()}
    ignore = [n for n, p in holder.named_parameters() if id(p) not in trained] + [n for n, _ in holder.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(holder, ignore)
    return DistributedDataParallel(holder, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, static_graph=True)


class _Trained(nn.Module):
    """The module the steps call, with the module that holds its trained parameters (LoRA's adapters)."""

    def __init__(self, module: nn.Module, owner: nn.Module | None):
        super().__init__()
        self.module = module
        self.owner = owner

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
