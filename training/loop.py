"""train(): the domain UNet recipe, stage by stage.

    prepare data -> cache latents -> build trainable -> AdamW -> LR schedule -> steps:
        check_interrupt, sample a batch (one bucket), noise it, loss under autocast, backward,
        refuse a non-finite loss, optimizer step, EMA, progress, checkpoint.

Every step's randomness (which images, flips, t, eps) comes from a generator seeded from
(seed, step) alone, so a run resumed from its state file at step k ends with the same weights
as a run that was never stopped. Step numbers count optimizer updates: step s is the s-th.
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

from .checkpoint import check_resume_config, read_state_header, restore_state, save_state
from .data import ImageSet
from .latents import LatentSet, cache_latents
from .lora import DEFAULT_TARGETS
from .noise import DiscreteSchedule, FlowSchedule, check_schedule, denoising_loss
from .trainable import MODES, ema_decay_at, ema_init, ema_update, enable_gradient_checkpointing, full_copy, lora_adapters

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("constant", "cosine")
# TrainConfig fields that may change between a run and its resumption (they do not change the math).
# options that change speed or bookkeeping, not the math: a run may be resumed with other values
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "preview_every", "gradient_checkpointing", "compile")
# Options that change the math of the steps still to run but may change on resume (e.g. a lower lr or
# another precision after a NaN loss): recorded in the state, a change is logged.
ADJUSTABLE_ON_RESUME = ("lr", "lr_schedule", "warmup_steps", "precision")


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


def sample_batch(data: LatentSet, step: int, config: TrainConfig, schedule: DiscreteSchedule | FlowSchedule | int) -> Batch:
    """Step `step`'s batch: a random image picks the bucket, batch_size images of that bucket
    (without replacement where the bucket has enough), flips, timesteps and noise. All on CPU,
    from step_generator(seed, step). schedule: what draws the timesteps (an int T: a discrete
    schedule's t ~ U{0..T-1}).
    """
    if isinstance(schedule, int):
        schedule = DiscreteSchedule(torch.zeros(schedule, dtype=torch.float64), "eps")
    g = step_generator(config.seed, step)
    images = data.images
    bucket = images[int(torch.randint(len(images), (1,), generator=g))].bucket
    members = [i for i, im in enumerate(images) if im.bucket == bucket]
    n, b = len(members), config.batch_size
    picks = torch.randperm(n, generator=g)[:b] if n >= b else torch.randint(n, (b,), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    x0 = torch.stack([
        images[members[i]].flipped if (config.flip and bool(f)) else images[members[i]].latent
        for i, f in zip(picks.tolist(), flips)
    ])
    t = schedule.draw(g, b)
    eps = torch.randn(x0.shape, generator=g)
    return Batch(bucket, x0, t, eps)


def run_config(config: TrainConfig, data: LatentSet, vae_id: str, prediction_type: str, unet: nn.Module,
               schedule: DiscreteSchedule | FlowSchedule) -> dict:
    """What a state file must agree on to be resumed: the config's math, the images, the VAE, the base."""
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    shapes = hashlib.sha256("".join(f"{k}:{list(v.shape)};" for k, v in unet.state_dict().items()).encode())
    return {
        **cfg,
        "image_set": data.image_set,
        "num_images": len(data.images),
        "vae_id": vae_id,
        "prediction_type": prediction_type,
        "schedule": schedule.id,
        "unet_shapes": shapes.hexdigest()[:16],
    }


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW: fused kernels on CUDA, foreach elsewhere."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
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
    x0, eps = batch.x0.to(device), batch.eps.to(device)  # [B, C, h, w]
    x_t, timestep, target = schedule.noised(x0, eps, batch.t)
    with torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"):
        prediction = model(x_t, timestep, **cond)
    if prediction.shape != x_t.shape:
        raise ValueError(f"the UNet returned {list(prediction.shape)} for input {list(x_t.shape)}; "
                         f"expected the raw model output, shaped like x")
    return denoising_loss(prediction, target)


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

    # 1. Data: every image fitted to its bucket and encoded once (cached on disk).
    image_set = ImageSet(images)
    n = len(image_set)
    data = cache_latents(
        image_set.bucketed(config.resolution), encode=encode, vae_id=vae_id, cache_dir=cache_dir, flip=config.flip,
        check_interrupt=check_interrupt,
        on_image=lambda done, secs: report(Progress("cache", done, n, None, done / max(secs, 1e-9), secs / done * (n - done))),
    )
    current = run_config(config, data, vae_id, prediction_type, unet, schedule)
    header = None
    if state_path is not None and os.path.exists(state_path):
        header = read_state_header(state_path)
        for key, saved, now in check_resume_config(header, current, ADJUSTABLE_ON_RESUME):
            log.info("Resuming %s with %s %s (saved %s)", state_path, key, now, saved)

    # 2. The trainable (a full copy, or LoRA adapters), AdamW, the fp16 loss scaler, the EMA.
    if config.mode == "full":
        trainable = full_copy(unet)
    else:
        trainable = lora_adapters(unet, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
    undo_checkpointing = lambda: None
    try:
        undo_checkpointing = enable_gradient_checkpointing(trainable.module, config.gradient_checkpointing)
        model, params = trainable.module, trainable.params
        if config.compile:
            model = torch.compile(model)
        optimizer = make_optimizer(list(params.values()), config, device)
        scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        ema = ema_init(params) if config.ema_decay > 0 else None
        start = 0 if header is None else header.step
        if header is not None:
            restore_state(header, params=params, ema=ema, optimizer=optimizer, scaler=scaler)
            log.info("Resuming %s at step %d of %d", state_path, start, config.steps)
        saved_step = header.step if header is not None else None
        conds: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        losses: list[float] = []
        t0 = time.monotonic()
        if start < config.steps:
            log.info("Training (%s) on %d images in %d buckets, steps %d..%d", config.mode, len(data.images),
                     len({im.bucket for im in data.images}), start + 1, config.steps)

        # 3. The steps.
        for step in range(start + 1, config.steps + 1):
            check_interrupt()
            batch = sample_batch(data, step, config, schedule)
            if batch.bucket not in conds:
                conds[batch.bucket] = _batch_cond(cond_for(*batch.bucket), config.batch_size, device)
            loss = denoising_step(model, batch, conds[batch.bucket], schedule, config.precision, device)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(step, f"the loss is {loss_value}", state_path, saved_step)
            scaler.scale(loss).backward()

            check_interrupt()  # before the update: an interrupt never leaves a half-applied step
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, params, ema_decay_at(step, config.ema_decay))
            losses.append(loss_value)

            elapsed, done = time.monotonic() - t0, step - start
            report(Progress("train", step, config.steps, loss_value, done * config.batch_size / max(elapsed, 1e-9),
                            elapsed / done * (config.steps - step)))
            if state_path is not None and (step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)):
                _check_finite(params, step, state_path, saved_step)
                save_state(state_path, step=step, config=current, params=params, ema=ema, optimizer=optimizer, scaler=scaler)
                saved_step = step
                if on_checkpoint is not None:
                    on_checkpoint(step, trainable.export(ema if ema is not None else params))
            if on_preview is not None and config.preview_every and step % config.preview_every == 0:
                on_preview(step, model)

        if losses:
            log.info("Training done at step %d (last loss %.4g)", config.steps, losses[-1])
        return TrainResult(
            weights=trainable.export(params),
            ema_weights=trainable.export(ema) if ema is not None else None,
            losses=losses,
            step=max(start, config.steps),
            start_step=start,
        )
    finally:
        undo_checkpointing()
        trainable.close()
