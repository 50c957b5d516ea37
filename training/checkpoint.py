"""Files: the training state (one safetensors file), the deliverable model file (`deliverable`:
its tensors; `fingerprint`: a short hash of a module's weights, how a file names its base), safe paths.

Every write is atomic: the tensors go to `<name>.tmp-<pid>` in the target's folder, are fsynced,
and replace the target with os.replace; the temp file is removed on any error, so a target is
either its old content or its complete new content, never half-written. Reads use safetensors
only (no pickle).

A training state holds (tensor keys):
    param.<name>              trainable weights                       (the optimizer's order: metadata "params")
    ema.<name>                EMA of the trainable weights            (only with EMA on)
    optim.<i>.exp_avg         AdamW first moment of parameter i
    optim.<i>.exp_avg_sq      AdamW second moment of parameter i
    optim.<i>.step            AdamW step count of parameter i
    scaler.scale              fp16 loss scale                         (only with fp16)
    scaler.growth_tracker
    step                      optimizer updates done (int64 scalar)
and metadata (str -> str): format, step, params (JSON list), config (JSON: what must match to resume),
and with validation (validation.py) `validation`: JSON [[step, loss or null], ...], every
measurement up to this state's step (states without it read as []).

A sharded state (TrainConfig.fsdp, sharded.py) is the same file without the param, ema and optim
tensors, with metadata `shards`: the folder (relative to the file's) where
torch.distributed.checkpoint wrote every rank's part of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:  # a type only: config.py -> distributed.py -> checkpoint.py (importing it here would be a cycle)
    from .config import TrainConfig

log = logging.getLogger(__name__)

STATE_FORMAT = "indomain-training-state/1"


def safe_join(root: str | os.PathLike, name: str) -> str:
    """root/name, refusing a name that is empty, absolute, or escapes root (`..`, symlinks).

    The node uses it for the user's save name. Subfolders inside root are allowed.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"save name {name!r} is empty; give a file name such as 'my_domain.safetensors'")
    if "\0" in name or os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith(("/", "\\")):
        raise ValueError(f"save name {name!r} must be a relative name inside {os.fspath(root)!r}, not an absolute path")
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, name))
    if path == base or os.path.commonpath([base, path]) != base:
        raise ValueError(f"save name {name!r} leaves the folder {os.fspath(root)!r}; use a plain name without '..'")
    return path


def atomic_save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file at `path` atomically (temp file, fsync, os.replace); creates the folder."""
    atomic_write(path, lambda tmp: save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                                             metadata=dict(metadata or {})))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes the file's content to the temp path `tmp`; then it replaces `path`
    atomically (fsync, os.replace, the folder fsynced); the temp file is removed on any error."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.name == "posix":  # make the rename itself durable
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save the deliverable (a full UNet state dict or a LoRA) as safetensors, atomically."""
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"model file {os.fspath(path)!r}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"model file {os.fspath(path)!r}: metadata {k!r} must map str to str, got {type(v).__name__}")
    atomic_save(path, tensors, metadata)
    log.info("Saved %d tensors to %s", len(tensors), os.fspath(path))


def _sharded(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state (AdamW: exp_avg, exp_avg_sq, step) by the parameter's
    place in `params`: the same for a plain and a sharded (ZeroRedundancyOptimizer) optimizer.
    For a sharded one this is a collective (every rank calls it) that gathers the whole state on
    rank 0; the other ranks get {}."""
    if _sharded(optimizer):
        optimizer.consolidate_state_dict(to=0)
        if torch.distributed.get_rank() != 0:
            return {}
        return {int(i): dict(v) for i, v in optimizer.state_dict()["state"].items() if v}
    return {i: dict(optimizer.state[p]) for i, p in enumerate(params) if optimizer.state.get(p)}


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Load per-parameter state (by place in `params`) into a plain or sharded optimizer; a sharded
    one keeps only its own rank's share."""
    index = {id(p): i for i, p in enumerate(params)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    inner = optimizer.optim if _sharded(optimizer) else optimizer
    if inner.defaults.get("fused") or inner.defaults.get("capturable"):  # their step counts live with the parameters
        for p, fields in inner.state.items():
            if isinstance(fields.get("step"), torch.Tensor):
                fields["step"] = fields["step"].to(p.device, torch.float32)
    elif type(inner).__module__.startswith("bitsandbytes"):  # its kernels take the step count as a Python int
        for fields in inner.state.values():
            if isinstance(fields.get("step"), torch.Tensor):
                fields["step"] = int(fields["step"])


class ResumeMismatch(ValueError):
    """The state file was made with a different training configuration."""


@dataclass(frozen=True)
class StateHeader:
    """What a state file says about itself, read without loading its tensors."""

    path: str
    step: int
    config: dict
    params: list[str]
    validation: tuple = ()  # ((step, validation loss or None), ...) up to `step`
    shards: str | None = None  # a sharded state's folder of tensors (relative to the file's folder), else None


def save_state(
    path: str | os.PathLike,
    *,
    step: int,
    config: dict,
    params: Mapping[str, torch.Tensor],
    ema: Mapping[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | Mapping[int, Mapping[str, torch.Tensor]],
    scaler: torch.amp.GradScaler | None,
    validation: list[tuple[int, float | None]] | None = None,
) -> None:
    """Write the whole training state as one safetensors file, atomically.

    optimizer: the optimizer, or its per-parameter state by the parameter's place in `params`
    (optimizer_state: a sharded optimizer's, gathered on rank 0). validation: the (step, loss)
    history to record (None or empty: none)."""
    names = list(params)
    tensors = {f"param.{n}": p for n, p in params.items()}
    tensors.update({f"ema.{n}": e for n, e in (ema or {}).items()})
    by_index = optimizer_state(optimizer, list(params.values())) if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    seen = set()
    for i in range(len(names)):
        for field, value in (by_index.get(i) or {}).items():
            value = torch.as_tensor(value)
            if value.numel() and value.data_ptr() in seen:  # one tensor shared by several parameters'
                value = value.clone()                       # states (bitsandbytes' quantization maps)
            seen.add(value.data_ptr())
            tensors[f"optim.{i}.{field}"] = value
    tensors.update(_step_and_scale(step, scaler))
    atomic_save(path, tensors, _metadata(step, names, config, validation))
    log.info("Saved training state at step %d to %s", step, os.fspath(path))


def save_sharded_header(path: str | os.PathLike, *, step: int, config: dict, names: list[str], scaler, shards: str,
                        validation: list[tuple[int, float | None]] | None = None) -> None:
    """A sharded state's file (module doc): what save_state writes but the parameters', EMA's and
    optimizer's tensors, which are in the folder `shards` (relative to the file's folder)."""
    atomic_save(path, _step_and_scale(step, scaler), {**_metadata(step, names, config, validation), "shards": shards})
    log.info("Saved training state at step %d to %s (its tensors in %s)", step, os.fspath(path), shards)


def _step_and_scale(step: int, scaler: torch.amp.GradScaler | None) -> dict[str, torch.Tensor]:
    tensors = {}
    if scaler is not None and scaler.is_enabled():
        tensors["scaler.scale"] = torch.tensor(scaler.get_scale(), dtype=torch.float64)
        tensors["scaler.growth_tracker"] = torch.tensor(scaler.state_dict()["_growth_tracker"], dtype=torch.int64)
    tensors["step"] = torch.tensor(step, dtype=torch.int64)
    return tensors


def _metadata(step: int, names: list[str], config: dict, validation) -> dict[str, str]:
    metadata = {"format": STATE_FORMAT, "step": str(step), "params": json.dumps(names), "config": json.dumps(config, sort_keys=True)}
    if validation:
        metadata["validation"] = json.dumps([[int(s), v] for s, v in validation])
    return metadata


def read_state_header(path: str | os.PathLike) -> StateHeader:
    """The step, config and parameter names of a state file; ValueError naming the file if unreadable."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        validation = tuple((int(s), None if v is None else float(v)) for s, v in json.loads(meta.get("validation", "[]")))
        return StateHeader(path, int(meta["step"]), json.loads(meta["config"]), json.loads(meta["params"]), validation,
                           meta.get("shards"))
    except Exception as e:  # safetensors, JSON and key errors all mean: not a usable state file
        raise ValueError(
            f"training state {path!r} is not a readable training state ({type(e).__name__}: {e}); "
            f"delete it or choose another name to start over"
        ) from e


def check_resume_config(header: StateHeader, current: dict, adjustable: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """Refuse to resume from a state whose config differs, naming each differing key; keys in
    `adjustable` may differ: their changes are returned as (key, saved, now)."""
    current = json.loads(json.dumps(current, sort_keys=True))  # compare as stored (tuples -> lists)
    keys = sorted(set(header.config) | set(current))
    changed = [(k, header.config.get(k), current.get(k)) for k in keys if header.config.get(k) != current.get(k)]
    diffs = [f"{k}: saved {saved!r}, now {now!r}" for k, saved, now in changed if k not in adjustable]
    if diffs:
        may = f" ({', '.join(adjustable)} may change)" if adjustable else ""
        raise ResumeMismatch(
            f"cannot resume from {header.path!r}: it was trained with a different configuration ({'; '.join(diffs)}). "
            f"Use the saved values to continue it{may}, or delete it / choose another name to start over."
        )
    return [c for c in changed if c[0] in adjustable]


def restore_state(
    header: StateHeader,
    *,
    params: Mapping[str, torch.nn.Parameter],
    ema: Mapping[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Load a state file's tensors into the given parameters, EMA, optimizer and scaler (in place)."""
    if header.shards is not None:
        raise ResumeMismatch(f"cannot resume from {header.path!r} without fsdp: it was written by a sharded (fsdp) run, "
                             f"its tensors in parts in the folder {header.shards!r}; resume it with fsdp (on any number "
                             "of processes, 1 included), or delete it / choose another name to start over")
    if list(params) != header.params:
        missing = sorted(set(header.params) - set(params))[:5]
        extra = sorted(set(params) - set(header.params))[:5]
        raise ResumeMismatch(
            f"cannot resume from {header.path!r}: its trainable parameters differ from this model's "
            f"(only in the file: {missing}; only in the model: {extra}); was it made for another base model?"
        )
    with safe_open(header.path, framework="pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for name, p in params.items():
                _copy_checked(header.path, f"param.{name}", f.get_tensor(f"param.{name}"), p)
                if ema is not None:
                    _copy_checked(header.path, f"ema.{name}", f.get_tensor(f"ema.{name}"), ema[name])
        state = {}
        for i in range(len(params)):
            fields = {k.split(".")[2]: f.get_tensor(k) for k in keys if k.startswith(f"optim.{i}.")}
            if fields:
                state[i] = fields
        _restore_scaler(header.path, f, keys, scaler)
    load_optimizer_state(optimizer, list(params.values()), state)


def restore_scaler(header: StateHeader, scaler: torch.amp.GradScaler | None) -> None:
    """The fp16 loss scale of a state file (a sharded state's: sharded.restore_sharded)."""
    with safe_open(header.path, framework="pt") as f:
        _restore_scaler(header.path, f, set(f.keys()), scaler)


def _restore_scaler(path: str, f, keys: set[str], scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None and scaler.is_enabled() and "scaler.scale" not in keys:
        log.info("%s has no fp16 loss scale (it was trained in another precision): starting from the initial scale", path)
    elif scaler is not None and scaler.is_enabled():
        sd = scaler.state_dict()
        sd["scale"] = float(f.get_tensor("scaler.scale"))
        sd["_growth_tracker"] = int(f.get_tensor("scaler.growth_tracker"))
        scaler.load_state_dict(sd)


def _copy_checked(path: str, key: str, value: torch.Tensor, into: torch.Tensor) -> None:
    if value.shape != into.shape:
        raise ResumeMismatch(f"cannot resume from {path!r}: {key} has shape {list(value.shape)}, the model needs {list(into.shape)}")
    into.copy_(value)


@torch.inference_mode()
def fingerprint(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights: every name and shape, and a strided sample of
    every tensor's values (hashing all of an SDXL UNet would take seconds).

    Read in inference mode, without views: the host's weights may be inference tensors, or
    parameters that refuse a view ("Inference tensors do not track version counter")."""
    return tensors_fingerprint(module.state_dict(keep_vars=True))


@torch.inference_mode()
def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """fingerprint() of a dict of tensors (e.g. a checkpoint's deliverable weights)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        picks = torch.arange(0, t.numel(), max(1, t.numel() // 256), device=t.device)[:256]
        source = t.float() if t.dtype.itemsize == 1 and t.is_floating_point() else t  # take has no fp8 kernel (CUDA)
        sample = torch.take(source, picks).float().cpu()  # no view of t: see nodes/training/differentiable.make_autograd_safe
        h.update(f"{name}{list(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def deliverable(weights: dict[str, torch.Tensor], config: TrainConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: a full UNet in the base's storage dtype; a LoRA as trained (float32)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float16  # e.g. an fp8-stored base: keep the trained weights in 16 bits
    if config.mode == "full":
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return weights
