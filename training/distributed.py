"""Several processes training one model (torchrun): which rank this is, and stops every rank agrees on.

The caller starts the processes and their process group (tools/train_domain.py under torchrun:
`torch.distributed.init_process_group`, NCCL on GPUs, gloo on the CPU); training/ only reads it.
Without a process group (the node, one GPU) everything here is the identity: rank 0 of 1.

What the ranks share:
- the global batch: every rank draws the same global batch from (seed, step) and takes its slice of
  batch_size / world images (plan.sample_batch, Batch.part), so N ranks compute what one would;
- the gradients: DistributedDataParallel averages them (a mean of equal slices' means is the mean;
  `data_parallel` synchronizes only the trained parameters);
- one status exchange per step (`agree`): every rank's loss, whether it is finite, and whether that
  rank was interrupted (`pending_interrupt` holds an interrupt until then), so that a NaN or a
  Ctrl-C stops every rank at the same step with the same decision (rank 0 reports it; the others
  raise StoppedByPeer);
- a checkpoint: rank 0 writes it and every rank learns whether the write succeeded (`save_agreed`),
  so a failed write stops every rank;
- a failure that cannot be agreed (an exception inside a step: out of memory, an error in a
  collective) is announced in the process group's store (`announce_failure`, from `step_failure`)
  by the rank that fails, which reports it and exits; the other ranks' next collective then fails
  (gloo: the peer closed the connection) or torchrun stops them (NCCL), and they raise
  StoppedByPeer quietly.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .checkpoint import optimizer_state, save_state
from .trainable import Trainable

log = logging.getLogger(__name__)

FAILED_KEY = "indomain/failed"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and reports progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


def ranks() -> Ranks:
    """This process's rank and the world size (0 of 1 without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Ranks()


class StoppedByPeer(RuntimeError):
    """Another rank stopped the run (it failed, diverged, was interrupted, or could not write a
    checkpoint); that rank, or rank 0, reports why. `known` is False when the other rank ended
    without saying why (e.g. killed by the system's out-of-memory killer)."""

    def __init__(self, reason: str, *, interrupted: bool = False, known: bool = True):
        super().__init__(reason)
        self.interrupted = interrupted
        self.known = known


def collective_device() -> torch.device:
    """Where a status tensor must live: this rank's GPU for NCCL (torch.cuda.set_device), the CPU otherwise."""
    if "nccl" in str(torch.distributed.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Status:
    losses: list[float]  # each rank's loss (NaN where that rank's loss was not finite)
    interrupted: list[int]  # the ranks that were interrupted

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def nonfinite(self) -> list[int]:
        return [r for r, v in enumerate(self.losses) if not torch.isfinite(torch.tensor(v))]


def agree(r: Ranks, loss: float, interrupted: bool) -> Status:
    """Every rank's loss and interrupt flag, the same on every rank (one all_reduce of 2N numbers)."""
    if not r.active:
        return Status([loss], [0] if interrupted else [])
    slots = torch.zeros(2 * r.world, dtype=torch.float64)
    slots[2 * r.rank] = loss
    slots[2 * r.rank + 1] = float(interrupted)
    slots = slots.to(collective_device())
    torch.distributed.all_reduce(slots)
    values = slots.cpu().tolist()
    return Status(values[0::2], [k for k in range(r.world) if values[2 * k + 1]])


def agree_flag(r: Ranks, flag: bool) -> list[int]:
    """The ranks whose flag is set (e.g. 'my checkpoint write failed'), the same on every rank."""
    if not r.active:
        return [0] if flag else []
    slots = torch.zeros(r.world, dtype=torch.float64)
    slots[r.rank] = float(flag)
    slots = slots.to(collective_device())
    torch.distributed.all_reduce(slots)
    return [k for k, v in enumerate(slots.cpu().tolist()) if v]


def _store():
    return torch.distributed.distributed_c10d._get_default_store()


def announce_failure(r: Ranks, message: str) -> None:
    """Tell the other ranks (through the process group's store) why this rank stops."""
    if not r.active:
        return
    try:
        _store().set(FAILED_KEY, f"{r}: {message}")
    except Exception as e:  # the store may be gone with the rank that hosted it
        log.debug("could not announce the failure: %s", e)


def peer_failure(timeout_s: float = 2.0) -> str | None:
    """The failure another rank announced, or None (none announced, or the store is gone)."""
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        if store.check([FAILED_KEY]):
            return store.get(FAILED_KEY).decode()
    except Exception as e:
        log.debug("could not read the failure key: %s", e)
    return None


def stopped_by_peer(r: Ranks, error: BaseException) -> StoppedByPeer | None:
    """If `error` (raised in a step on this rank) comes from another rank's failure, the
    StoppedByPeer to raise instead; None when it is this rank's own failure."""
    if not r.active or isinstance(error, (KeyboardInterrupt, torch.OutOfMemoryError)):
        return None
    message = peer_failure()
    if message is not None and not message.startswith(f"{r}:"):
        return StoppedByPeer(f"stopped because {message}")
    dist_errors = tuple(t for t in (getattr(torch.distributed, "DistError", None),) if t is not None)
    text = str(error)
    if isinstance(error, dist_errors) or "Connection closed by peer" in text or "Connection reset by peer" in text:
        return StoppedByPeer(f"another rank ended without a message ({type(error).__name__}: {text.splitlines()[0][:200]}); "
                             "it may have been killed (e.g. by the system's out-of-memory killer)", known=False)
    return None


def pending_interrupt(check_interrupt: Callable[[], None], r: Ranks) -> BaseException | None:
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


def step_failure(r: Ranks, error: BaseException, step: int) -> BaseException:
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


def save_agreed(r: Ranks, state_path: str, step: int, config: dict, params, ema, optimizer, scaler, after,
                validation=None) -> None:
    """Rank 0 writes the state (with the `validation` history; and `after()`: the host's model file);
    every rank learns whether it succeeded, so a failed write stops every rank."""
    by_index = optimizer_state(optimizer, list(params.values()))  # a collective for a sharded optimizer

    def write() -> None:
        save_state(state_path, step=step, config=config, params=params, ema=ema, optimizer=by_index, scaler=scaler,
                   validation=validation)
        if after is not None:
            after()
    written_by_main(r, step, write)


def written_by_main(r: Ranks, step: int, write: Callable[[], None]) -> None:
    """Rank 0 calls write() (the checkpoint of `step`); every rank learns whether it succeeded: rank
    0 raises its own error, the others StoppedByPeer, so a failed write stops every rank."""
    failure = None
    if r.main:
        try:
            write()
        except BaseException as e:
            if not r.active:
                raise
            failure = mark_own(r, e)
    if r.active and agree_flag(r, failure is not None) and failure is None:
        raise StoppedByPeer(f"stopped because rank 0 could not write the checkpoint at step {step} (its message says why)")
    if failure is not None:
        raise failure


def gather_objects(r: Ranks, obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if not r.active:
        return [obj]
    out: list = [None] * r.world
    torch.distributed.all_gather_object(out, obj)
    return out


def shard(items: Sequence, r: Ranks) -> list[int]:
    """The indices this rank handles: every world-th item from its rank (balanced, in order)."""
    return list(range(r.rank, len(items), r.world))


def mark_own(r: Ranks, error: BaseException) -> BaseException:
    """Mark `error` as this rank's own failure (not one every rank shares): report_stop logs it on
    this rank, whichever it is."""
    try:
        error.indomain_failed_rank = r.rank
    except AttributeError:  # an exception type without a __dict__
        pass
    return error


def _own(r: Ranks, error: BaseException | None) -> bool:
    while error is not None:
        if getattr(error, "indomain_failed_rank", None) == r.rank:
            return True
        error = error.__cause__
    return False


def report_stop(r: Ranks, error: BaseException, logger: logging.Logger, kept: str = "") -> int:
    """Log why training stopped, once for all ranks, and return the process's exit code.

    Alone: the error (ERROR), or for an interrupt "stopped" (WARNING, code 130). Under torchrun:
    an error every rank shares (bad input, a diverged loss, an agreed interrupt) is reported by
    rank 0 only; a rank's own failure (out of memory, an exception in a step, a failed write) by
    that rank, naming it; the other ranks stop quietly (StoppedByPeer, logged at INFO).
    `kept`: what was kept, e.g. "The last checkpoint x.indomain-state (step 40) is kept."
    """
    tail = f" {kept}" if kept else ""
    interrupted = isinstance(error, KeyboardInterrupt) or (isinstance(error, StoppedByPeer) and error.interrupted)
    if interrupted:
        if r.main:
            logger.warning("stopped%s; every rank stopped at the same step.%s Run the same command again to resume." % (
                f" ({error})" if isinstance(error, StoppedByPeer) else "", tail) if r.active else
                "stopped.%s Run the same command again to resume." % tail)
        return 130
    if isinstance(error, StoppedByPeer):
        if r.main and not error.known:
            logger.error("%s: %s; every rank stopped.%s", r, error, tail)
        else:
            logger.info("%s: %s", r, error)
        return 1
    if not r.active:
        logger.error("%s", error)
    elif _own(r, error):
        logger.error("%s failed: %s: %s; every rank stopped.%s", r, type(error).__name__, error, tail)
    elif r.main:
        logger.error("%s", error)
    else:
        logger.debug("%s: %s (reported by rank 0)", r, error)
    return 1


def leave(code: int) -> None:
    """End this rank's process with `code` now, its logs and streams flushed (torchrun only).

    A finished or stopped rank leaves without the interpreter's teardown: there, the process
    group's background threads (gloo's) could abort the process after the run had ended well
    ("terminate called without an active exception", exit -6; seen on the 2-core CI machine
    under load). Every file was written, atomically, before this is called."""
    import os
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


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
