"""train(): the domain UNet recipe, stage by stage.

    prepare the data (each image fitted to its bucket and VAE-encoded once: data.py, latents.py)
    -> the trainable (a full copy or LoRA adapters: trainable.py), its optimizer (optimizer.py),
       the fp16 loss scaler, the EMA; a state file's content restored (checkpoint.py)
    -> the steps: check_interrupt, the step's batch (plan.py), noise it, the loss under autocast,
       backward (once per micro-batch with gradient accumulation), refuse a non-finite loss,
       optimizer step, EMA, progress, validation and checkpoint, the host's samples, preview
    -> the result: the deliverable weights (and their EMA), the losses, the validation losses.

batch_size is the global batch: the images of one optimizer update. With gradient_accumulation k
each update accumulates the gradients of k micro-batches of batch_size / k images (each micro-batch's
loss divided by k: the mean over the global batch); the step's images, flips, timesteps and noise
are those of one batch of batch_size, so k changes memory, not the math (up to float rounding), and
may change on resume. Under torchrun (a process group, distributed.py) batch_size, lr and steps
likewise mean what they mean on one GPU: each rank trains on its slice of each micro-batch
(processes x micro-batch x gradient_accumulation = batch_size; the gradients are exchanged once
per update), and a run resumes on any number of ranks that divides batch_size / k. Rank 0 alone
writes the state file and reports progress.

With validation_share a share of the images is held out (validation.py); their loss is measured
at step 0, at each checkpoint step and at the end, recorded in the state file and returned.

on_samples, where the host gives it, is handed each checkpoint's deliverable weights (those of
on_checkpoint; also at the end, and once at the start of a resumed run, with the state's weights)
with the trainable suspended for the length of the call: the host's module computes as before
training (LoRA: the adapters off), so the host can sample its base beside the weights being
trained (the node's validation samples). Rank 0 alone calls it, as it does on_preview.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .checkpoint import StateHeader, check_resume_config, read_state_header, restore_state
from .config import ADJUSTABLE_ON_RESUME, SAMPLER, TrainConfig, autocast_dtype, cuda_graph_reason, run_config
from .data import ImageSet
from .denoise import _batch_cond, denoising_step, noised
from .distributed import Ranks, StoppedByPeer, agree, data_parallel, gather_objects, pending_interrupt, ranks, step_failure
from .graphed import GraphedSteps
from .hooks import _after_update, _samples, _validate
from .latents import FileIndex, LatentSet, cache_latents
from .noise import DiscreteSchedule, FlowSchedule, check_schedule
from .optimizer import learning_rate, make_optimizer
from .plan import Batch, bucket_members, sample_batch
from .results import Progress, TrainingDiverged, TrainResult
from .sharded import loss_scaler, restore_sharded, shard_trainable, shard_units
from .trainable import Trainable, ema_decay_at, ema_init, ema_update, enable_gradient_checkpointing, full_copy, lora_adapters
from .validation import split

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """What train()'s stages share: its arguments, what the preparation builds, what the steps update."""
    config: TrainConfig
    r: Ranks
    device: torch.device
    schedule: DiscreteSchedule | FlowSchedule
    state_path: str | None
    check_interrupt: Callable[[], None]
    report: Callable[[Progress], None]
    cond_for: Callable[[int, int], Mapping[str, torch.Tensor]]
    on_preview: Callable[[int, nn.Module], None] | None
    on_checkpoint: Callable[[int, dict[str, torch.Tensor]], None] | None
    on_samples: Callable[[int, dict[str, torch.Tensor], bool], None] | None = None
    data: LatentSet | None = None  # the training images (without the held-out ones)
    held_out: list = field(default_factory=list)  # validation.split's held-out images
    validation: list[tuple[int, float | None]] = field(default_factory=list)  # (step, validation loss) so far
    current: dict | None = None  # run_config: what the state file records
    trainable: Trainable | None = None
    undo_checkpointing: Callable[[], None] = lambda: None
    model: nn.Module | None = None  # what on_preview gets
    forward: nn.Module | None = None  # what the steps call (under DDP, compiled)
    ddp: nn.Module | None = None  # under torchrun: the DistributedDataParallel module (its no_sync)
    params: dict[str, nn.Parameter] | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: dict[str, torch.Tensor] | None = None
    graphed: GraphedSteps | None = None
    start: int = 0  # the step the run starts after (the resumed state's)
    saved_step: int | None = None  # the step of the last state written (or resumed)
    conds: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict)  # by bucket and batch size
    losses: list[float] = field(default_factory=list)
    t0: float = 0.0

    def info(self, *args) -> None:
        """One report, from rank 0 (log.info there, log.debug on the other ranks)."""
        (log.info if self.r.main else log.debug)(*args)

    def close(self) -> None:
        """Give back what the preparation took: the graphs, checkpointing, the host's module."""
        if self.graphed is not None:
            self.graphed.close()
        self.undo_checkpointing()
        self.trainable.close()


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
    on_samples: Callable[[int, dict[str, torch.Tensor], bool], None] | None = None,
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
    run = _Run(config, ranks(), device, schedule, os.fspath(state_path) if state_path is not None else None,
               check_interrupt, on_progress or (lambda info: None), cond_for, on_preview, on_checkpoint, on_samples)
    _check_processes(run)

    # 1. Data: every image fitted to its bucket and encoded once (cached on disk; sharded across ranks);
    #    the held-out share split off.
    run.data = _prepare_data(run, images, encode, vae_id, cache_dir)
    run.current = run_config(config, run.data, vae_id, prediction_type, unet, schedule)
    run.data, run.held_out = split(run.data, config.validation_share)
    header = _resume_header(run)

    # 2. The trainable (a full copy, or LoRA adapters), AdamW, the fp16 loss scaler, the EMA.
    run.trainable = _make_trainable(unet, config, release_base)
    try:
        _prepare_training(run, header)
        if header is not None and run.on_samples is not None:  # the resumed checkpoint's (the host makes them if missing)
            _samples(run, run.start, resumed=True)
            run.t0 = time.monotonic()  # (the speed and ETA of the steps to come leave them out)
        # 3. The steps.
        for step in range(run.start + 1, config.steps + 1):
            _step(run, step)
        # 4. The result.
        return _result(run)
    finally:
        run.close()


def _check_processes(run: _Run) -> None:
    """ValueError unless the global batch divides among the processes and micro-batches and CUDA graphs can run here."""
    config, r = run.config, run.r
    k = config.gradient_accumulation
    if config.batch_size % (r.world * k):
        each = f"batch_size / {r.world}" if k == 1 else f"batch_size / ({r.world} x {k}) in each of {k} micro-batches"
        raise ValueError(f"batch_size={config.batch_size} is the global batch and must be divisible by the {r.world} "
                         f"processes{f' x gradient_accumulation {k}' if k > 1 else ''} (each trains on {each}); "
                         f"use a multiple of {r.world * k}")
    if config.cuda_graph and (reason := cuda_graph_reason(run.device)):
        raise ValueError(f"cuda_graph=True: {reason}")


def _prepare_data(run: _Run, images, encode, vae_id: str, cache_dir) -> LatentSet:
    """The training set's latents: every image fitted to its bucket and encoded once (cached on
    disk; sharded across ranks), unreadable images reported, the cache stage's progress reported."""
    config, r, report = run.config, run.r, run.report
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
        encode=encode, vae_id=vae_id, cache_dir=cache_dir, flip=config.flip, check_interrupt=run.check_interrupt,
        on_image=on_image, ranks=r,
    )
    if r.main:
        index.save(data.images)
    if r.active:
        image_set.report_unreadable(sum(gather_objects(r, unreadable), []), warn=r.main)
        if r.main:
            secs = time.monotonic() - t_cache
            report(Progress("cache", len(data.images), n, None, len(data.images) / max(secs, 1e-9), 0.0))
    return data


def _resume_header(run: _Run) -> StateHeader | None:
    """The state file's header if there is one to resume (ResumeMismatch unless its config agrees
    with this run's); the options that changed since are logged."""
    if run.state_path is None or not os.path.exists(run.state_path):
        return None
    header = read_state_header(run.state_path)
    if "sampler" not in header.config:  # written by 0.3.0 or earlier: it goes on with the epoch order
        run.info("%s was written before the epoch order; the run goes on with it", run.state_path)
        header.config["sampler"] = SAMPLER
    for key, saved, now in check_resume_config(header, run.current, ADJUSTABLE_ON_RESUME):
        run.info("Resuming %s with %s %s (saved %s)", run.state_path, key, now, saved)
    return header


def _make_trainable(unet: nn.Module, config: TrainConfig, release_base: Callable[[], None] | None) -> Trainable:
    """A full copy of the UNet (the base released to the host), or LoRA adapters on it."""
    if config.mode == "full":
        trainable = full_copy(unet, torch.device("cpu") if config.fsdp else None)  # fsdp: sharded from the CPU
        if release_base is not None:  # the frozen base is not read again: its memory is the host's to use
            release_base()
        return trainable
    return lora_adapters(unet, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)


def _prepare_training(run: _Run, header: StateHeader | None) -> None:
    """Gradient checkpointing, the module the steps call (DDP, compiled), the optimizer, the fp16
    loss scaler, the EMA, the CUDA graphs; the state file's content restored."""
    config, r, device = run.config, run.r, run.device
    run.undo_checkpointing = enable_gradient_checkpointing(run.trainable.module, config.gradient_checkpointing,
                                                           preserve_rng_state=not config.cuda_graph)
    if config.fsdp:  # the full copy sharded over the processes (FSDP2, sharded.py): its params are the shards
        run.trainable = shard_trainable(run.trainable, shard_units(run.trainable.module, config.gradient_checkpointing),
                                        config.precision, config.cpu_offload, device)
    model, params = run.trainable.module, run.trainable.params
    run.ddp = data_parallel(run.trainable, device) if r.active and not config.fsdp else None
    forward = run.ddp if run.ddp is not None else model  # what the steps call
    if config.compile:
        forward = torch.compile(forward)
        model = forward if run.ddp is None else model
    run.model, run.forward, run.params = model, forward, params
    run.optimizer = make_optimizer(list(params.values()), config, device, sharded=r.active and config.shard_optimizer)
    run.scaler = loss_scaler(device, config.precision == "fp16", config.fsdp)
    run.ema = ema_init(params) if config.ema_decay > 0 else None
    run.graphed = GraphedSteps(model, list(params.values()), autocast_dtype(config.precision)) if config.cuda_graph else None
    run.start = 0 if header is None else header.step
    if header is not None:
        if config.fsdp:  # the parts of a sharded state, resharded for this number of processes
            restore_sharded(header, run.trainable.module, params, run.ema, run.optimizer, run.scaler)
        else:
            restore_state(header, params=params, ema=run.ema, optimizer=run.optimizer, scaler=run.scaler)
        run.info("Resuming %s at step %d of %d", run.state_path, run.start, config.steps)
    run.saved_step = header.step if header is not None else None
    run.validation = [tuple(v) for v in header.validation] if header is not None else []
    k = config.gradient_accumulation
    if run.start < config.steps:
        run.info("Training (%s) on %d images in %d buckets, steps %d..%d%s%s%s", config.mode, len(run.data.images),
                 len(bucket_members(run.data)), run.start + 1, config.steps,
                 f", {r.world} processes of {config.batch_size // (r.world * k)} images each" if r.active else "",
                 f", {k} micro-batches of {config.batch_size // k} images per step" if k > 1 else "",
                 f", {len(run.held_out)} images held out for validation" if run.held_out else "")
        if run.held_out and run.start == 0:  # the base's validation loss: where the curve starts
            _validate(run, 0)
    run.t0 = time.monotonic()


def _step(run: _Run, step: int) -> None:
    """Update `step`: the batch's loss and gradients, the outcome every rank agrees on (torchrun),
    the optimizer step and the EMA; then progress, the checkpoint and the preview when due."""
    r = run.r
    stop = pending_interrupt(run.check_interrupt, r)
    batch = sample_batch(run.data, step, run.config, run.schedule)
    try:
        loss_value, stop, status = _loss_and_gradients(run, step, batch, stop)
    except BaseException as e:
        raise step_failure(r, e, step) from None
    if status is not None:
        loss_value = _agreed_loss(run, step, status, stop)
    lr = _update(run, step)
    run.losses.append(loss_value)
    _after_update(run, step, loss_value, lr)


def _loss_and_gradients(run: _Run, step: int, batch: Batch, stop: BaseException | None):
    """(loss, the pending interrupt, the ranks' agreed status or None alone) of one global batch, its
    gradients computed: this rank's slice of each of the gradient_accumulation micro-batches, each
    micro-batch's loss divided by their number (under torchrun the gradients are exchanged at the
    last one only); the loss is the micro-batches' mean. Alone, a non-finite loss raises
    TrainingDiverged; an interrupt between micro-batches is held until the step's end (torchrun)."""
    r, k = run.r, run.config.gradient_accumulation
    losses = []
    for i in range(k):
        if i:
            stop = stop or pending_interrupt(run.check_interrupt, r)
        micro = batch.part(i, k).part(r.rank, r.world)
        # DDP with static_graph records the graph in its first backward, which must exchange the
        # gradients (under no_sync torch's reducer fails an internal assert): this process's first step syncs each.
        sync = run.ddp is None or i == k - 1 or step == run.start + 1
        with contextlib.nullcontext() if sync else run.ddp.no_sync():
            losses.append(_micro_step(run, step, micro, k))
    loss_value = losses[0] if k == 1 else math.fsum(losses) / k
    stop = stop or pending_interrupt(run.check_interrupt, r)  # before the update: an interrupt never leaves a half-applied step
    status = agree(r, loss_value, stop is not None) if r.active else None  # the same decision on every rank
    return loss_value, stop, status


def _micro_step(run: _Run, step: int, batch: Batch, k: int) -> float:
    """One micro-batch's loss, its gradients (of loss / k) added to the parameters' .grad."""
    r, conds = run.r, run.conds
    key = (batch.bucket, len(batch.t))
    if key not in conds:
        conds[key] = _batch_cond(run.cond_for(*batch.bucket), len(batch.t), run.device)
    if run.graphed is not None:  # forward and backward in one replay; the weights are not touched yet (k is 1)
        loss = run.graphed(*noised(batch, run.schedule, run.device), conds[key])
    else:
        loss = denoising_step(run.forward, batch, conds[key], run.schedule, run.config.precision, run.device)
    loss_value = loss.item()
    if not r.active and not math.isfinite(loss_value):
        raise TrainingDiverged(step, f"the loss is {loss_value}", run.state_path, run.saved_step)
    if run.graphed is None:
        run.scaler.scale(loss / k if k > 1 else loss).backward()
    return loss_value


def _agreed_loss(run: _Run, step: int, status, stop: BaseException | None) -> float:
    """Under torchrun: the mean loss of the ranks, or the agreed stop (an interrupt, a non-finite loss) raised."""
    if status.interrupted:
        raise stop if stop is not None else StoppedByPeer(
            f"stopped because rank {status.interrupted[0]} was interrupted", interrupted=True)
    if status.nonfinite:
        bad = ", ".join(f"rank {k}: {status.losses[k]}" for k in status.nonfinite)
        error = TrainingDiverged(step, f"the loss is not finite ({bad})", run.state_path, run.saved_step)
        raise error if run.r.main else StoppedByPeer(f"stopped because {error}")
    return status.loss


def _update(run: _Run, step: int) -> float:
    """The optimizer step at this step's learning rate (returned), then the EMA."""
    lr = learning_rate(step, run.config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    try:
        run.scaler.step(run.optimizer)  # a sharded optimizer broadcasts its parameters: a collective
    except BaseException as e:
        raise step_failure(run.r, e, step) from None
    run.scaler.update()
    if run.graphed is None:  # the graphs keep their gradient tensors (zeroed before each step)
        run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        ema_update(run.ema, run.params, ema_decay_at(step, run.config.ema_decay))
    return lr


def _result(run: _Run) -> TrainResult:
    """The trained weights and their EMA as the deliverable, the losses of this call."""
    config, export, losses = run.config, run.trainable.export, run.losses
    if losses:
        run.info("Training done at step %d (last loss %.4g)", config.steps, losses[-1])
    return TrainResult(
        weights=export(run.params),
        ema_weights=export(run.ema) if run.ema is not None else None,
        losses=losses,
        step=max(run.start, config.steps),
        start_step=run.start,
        validation=list(run.validation),
    )
