"""What follows an update (loop.py's step): progress; at a checkpoint step the validation loss,
the state file (and the host's model file), the host's samples; the preview."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Mapping

import torch

from .config import autocast_dtype
from .denoise import _batch_cond
from .distributed import save_agreed, step_failure
from .results import Progress, TrainingDiverged
from .sharded import save_sharded
from .validation import finite_or_none, validation_loss

if TYPE_CHECKING:
    from .loop import _Run


def _after_update(run: _Run, step: int, loss_value: float, lr: float) -> None:
    """Progress; at a checkpoint step the validation loss, the state file (and the host's model
    file), the host's samples; the preview."""
    config, r, params, ema = run.config, run.r, run.params, run.ema
    elapsed, done = time.monotonic() - run.t0, step - run.start
    if r.main:
        run.report(Progress("train", step, config.steps, loss_value, done * config.batch_size / max(elapsed, 1e-9),
                            elapsed / done * (config.steps - step), lr))
    due = step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)
    if due and run.held_out:
        _validate(run, step)
    if run.state_path is not None and due:
        _check_finite(params, step, run.state_path, run.saved_step)  # the same weights on every rank: the same outcome
        on_checkpoint, export = run.on_checkpoint, run.trainable.export
        try:
            if config.fsdp:  # each rank writes its part; the model file's weights gathered by every rank, written by rank 0
                save_sharded(r, run.state_path, step, run.current, run.trainable.module, params, ema, run.optimizer,
                             run.scaler, lambda: export(ema if ema is not None else params), on_checkpoint, run.validation)
            else:
                save_agreed(r, run.state_path, step, run.current, params, ema, run.optimizer, run.scaler,
                            lambda: on_checkpoint(step, export(ema if ema is not None else params)) if on_checkpoint else None,
                            validation=run.validation)
        except BaseException as e:
            raise step_failure(r, e, step) from None
        run.saved_step = step
    if due:
        _samples(run, step)
    if r.main and run.on_preview is not None and config.preview_every and step % config.preview_every == 0:
        run.on_preview(step, run.model)


def _samples(run: _Run, step: int, resumed: bool = False) -> None:
    """on_samples (rank 0): the deliverable weights of `step` (those on_checkpoint writes: the EMA's
    where EMA is on), the trainable suspended for the call (the host's module as before training)."""
    if run.on_samples is None:
        return
    weights = run.trainable.export(run.ema if run.ema is not None else run.params)  # with fsdp a collective
    if not run.r.main:
        return
    with run.trainable.suspended():
        run.on_samples(step, weights, resumed)


def _validate(run: _Run, step: int) -> None:
    """The held-out images' loss after `step` updates (validation.py), recorded and reported."""
    config, r = run.config, run.r
    chunk = config.batch_size // (config.gradient_accumulation * r.world)  # the micro-batch: it fits

    def cond(bucket: tuple[int, int], n: int) -> dict[str, torch.Tensor]:
        if (bucket, n) not in run.conds:
            run.conds[(bucket, n)] = _batch_cond(run.cond_for(*bucket), n, run.device)
        return run.conds[(bucket, n)]

    try:
        loss = validation_loss(run.trainable.module, run.held_out, run.schedule, cond, autocast_dtype(config.precision),
                               run.device, chunk, r, even=config.fsdp)
    except BaseException as e:
        raise step_failure(r, e, step) from None
    run.validation.append((step, finite_or_none(loss)))
    run.info("Validation loss at step %d: %.6g (%d held-out images)", step, loss, len(run.held_out))
    if r.main:
        run.report(Progress("validation", step, config.steps, loss, 0.0, 0.0))


def _check_finite(params: Mapping[str, torch.Tensor], step: int, state_path, saved_step) -> None:
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(step, f"weight {name} is not finite", state_path, saved_step)

