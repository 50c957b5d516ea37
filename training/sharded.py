"""Full mode sharded over the processes (TrainConfig.fsdp): FSDP2, its checkpoints, its model file.

Under torchrun DistributedDataParallel keeps a whole copy of the weights, gradients and AdamW
states on every GPU (16 bytes per parameter: SDXL 42 GiB, Flux.1 dev 192 GiB). FSDP2
(`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023, "PyTorch FSDP") keeps 1/N of each on
each of N processes: a block's weights are all-gathered just before its forward (and again before
its backward), its gradients reduce-scattered after, so each rank's optimizer updates its shard.

- `shard_trainable`: the full copy's blocks and then the whole copy under fully_shard; the
  parameters become DTensors sharded along their first dimension. Mixed precision
  (MixedPrecisionPolicy): the blocks compute in bf16 (or fp16) from fp32 master weights, the
  gradients are reduced in fp32. With cpu_offload (CPUOffloadPolicy) the shards, their gradients
  and the AdamW states live in CPU memory and the optimizer steps there (one GPU can train a model
  whose fp32 weights and states it cannot hold). Gradient checkpointing composes: the checkpointed
  blocks are the sharded units, so a block's recomputation in backward runs after FSDP has
  gathered its weights for that backward.
- The EMA is kept of the local shards (an EMA of the shards is the shards of the EMA).
- `export` gathers the weights (or their EMA) one tensor at a time: the full tensors on rank 0
  (on the CPU), nothing on the other ranks; every rank must call it (a collective).
- `save_sharded` writes the state with torch.distributed.checkpoint: every rank writes its part
  of the weights, EMA and AdamW states into one folder `<state>.shards/step-<n>-<t>`, which rank
  0 renames into place when every part is written; then rank 0 writes the state file (the header:
  step, config, validation, the loss scale, and the folder's name: checkpoint.save_sharded_header),
  atomically, which is the commit: a crash leaves the previous header and its folder. Then the
  gathered deliverable model file (on_checkpoint, rank 0). DCP records each tensor's global
  shape and its shards' offsets, so `restore_sharded` loads it on any number of processes (1 <-> N).
- The folder must be one that every process can read and write (a shared filesystem across
  machines), as must the latent cache (docs: README, CONTRIBUTING).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import ResumeMismatch, StateHeader, restore_scaler, save_sharded_header
from .distributed import Ranks, written_by_main
from .trainable import Trainable

log = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards"  # <state>.shards/: the sharded checkpoints' folders
# Why adamw8bit and fsdp do not go together (TrainConfig.validate raises it; tests/test_fsdp.py checks both halves).
EIGHT_BIT_REFUSAL = (
    "optimizer='adamw8bit' with fsdp: use one or the other. bitsandbytes' 8-bit kernels take plain tensors: on "
    "FSDP's sharded DTensor parameters they fail (bitsandbytes 0.50, torch 2.14: 'optimizer_update_32bit ... does "
    "not have a sharding strategy registered' for tensors under 4096 values, 'optimizer_update_8bit_blockwise got "
    "mixed torch.Tensor and DTensor' for the others), and its block-wise quantized states (one absmax per block of "
    "256 values of the whole flattened tensor) would not reshard when a run resumes on another number of processes. Use "
    "optimizer adamw with fsdp (cpu_offload keeps its states in CPU memory), or adamw8bit with DDP")


def process_group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shard_units(module: nn.Module, names: Sequence[str]) -> list[str]:
    """The submodules to shard each on its own, deepest first (FSDP2 nests them; the root takes the
    rest): the gradient-checkpointed blocks where given (the family's blocks: ComfyUI's
    input_blocks.N, Flux's double_blocks.N ...), else every element of the outermost ModuleLists."""
    if names:
        return sorted(dict.fromkeys(names), key=lambda n: -n.count("."))
    units: list[str] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                units.extend(f"{path}.{k}" for k, _ in child.named_children())
            else:
                visit(f"{path}.", child)

    visit("", module)
    return units


def fsdp_policies(precision: str, cpu_offload: bool) -> dict:
    """fully_shard's keyword arguments: the mixed precision policy of `precision` (bf16 or fp16
    compute from fp32 master weights, gradients reduced in fp32; fp32: none) and the CPU offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs = {}
    if precision in ("bf16", "fp16"):
        compute = torch.bfloat16 if precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    if cpu_offload:  # pinned memory needs a GPU (torch: "Found no NVIDIA driver" on a CPU-only machine)
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return kwargs


def loss_scaler(device: torch.device, enabled: bool, fsdp: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler; with fsdp torch's ShardedGradScaler, which all-reduces whether any rank's
    gradient shards hold an inf or NaN, so every rank skips the same steps (each sees only its shards)."""
    if fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def shard_trainable(trainable: Trainable, units: Sequence[str], precision: str, cpu_offload: bool,
                    device: torch.device) -> Trainable:
    """The full copy under FSDP2 (module doc), sharded over every process of the process group (1
    included); the returned Trainable's params are the sharded parameters, by the same names, and
    its export gathers (a collective: every rank calls it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not process_group_ready():
        raise ValueError("fsdp needs a process group: run the trainer under torchrun (--nproc-per-node 1 on one GPU)")
    module = trainable.module  # (on the CPU: fully_shard moves each unit's shards to the device, or keeps them offloaded)
    names = list(trainable.params)
    trainable.params.clear()  # the whole parameters, not kept past their unit's sharding
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kwargs = fsdp_policies(precision, cpu_offload)
    modules = dict(module.named_modules())
    for name in units:
        fully_shard(modules[name], mesh=mesh, **kwargs)
    fully_shard(module, mesh=mesh, **kwargs)
    params = dict(module.named_parameters())
    if list(params) != names:
        raise RuntimeError(f"fsdp changed the parameters' names ({names[:3]} -> {list(params)[:3]})")
    rank0 = torch.distributed.get_rank() == 0

    def export(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in module.state_dict().items():
            full = gather(values.get(k, v), device)
            if rank0:
                out[k] = full.detach().cpu()
        return out

    return dataclasses.replace(trainable, params=params, export=export)


def gather(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), a plain tensor as it is. Offloaded
    shards (CPU) are gathered on `device`, where the process group's collectives run."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if t.to_local().device.type != device.type:
        t = DTensor.from_local(t.to_local().to(device), t.device_mesh, t.placements, run_check=False,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor()


def _state(module: nn.Module, optimizer: torch.optim.Optimizer, ema: Mapping[str, torch.Tensor] | None) -> dict:
    """What a sharded checkpoint holds, as DCP saves and loads it: the weights and AdamW states by
    parameter name (torch.distributed.checkpoint.state_dict), the EMA shards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = dict(ema)
    return state


def _folder_name(r: Ranks, step: int) -> str:
    """A new folder's name, the same on every rank (rank 0's, broadcast): step and time."""
    name = [f"step-{step}-{time.time_ns() // 1_000_000}"]
    if r.active:
        torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def save_sharded(r: Ranks, state_path: str, step: int, config: dict, module: nn.Module, params: Mapping[str, torch.Tensor],
                 ema, optimizer, scaler, weights: Callable[[], dict], on_checkpoint, validation=None) -> None:
    """The sharded state at `step` (module doc) and, from rank 0, the deliverable model file
    (on_checkpoint(step, weights()), weights() gathered on every rank); every rank learns whether
    rank 0's writes succeeded (as distributed.save_agreed), so a failed write stops every rank."""
    import torch.distributed.checkpoint as dcp

    shards = state_path + SHARDS_SUFFIX
    name = _folder_name(r, step)
    tmp = os.path.join(shards, name + ".tmp")
    dcp.save(_state(module, optimizer, ema), checkpoint_id=tmp)  # every rank its part; rank 0 the metadata, last
    gathered = weights() if on_checkpoint is not None else None  # a collective

    def write() -> None:
        os.replace(tmp, os.path.join(shards, name))
        save_sharded_header(state_path, step=step, config=config, names=list(params), scaler=scaler,
                            shards=os.path.join(os.path.basename(shards), name), validation=validation)
        _remove_others(shards, keep=name)
        if on_checkpoint is not None:
            on_checkpoint(step, gathered)
    written_by_main(r, step, write)


def _remove_others(shards: str, keep: str) -> None:
    """The folders of earlier checkpoints (and unfinished ones) in `shards`, but `keep`."""
    for entry in os.listdir(shards):
        if entry != keep:
            shutil.rmtree(os.path.join(shards, entry), ignore_errors=True)


def remove_sharded(state_path: str) -> None:
    """A sharded state's folders (starting over); nothing if there are none."""
    shutil.rmtree(state_path + SHARDS_SUFFIX, ignore_errors=True)


def restore_sharded(header: StateHeader, module: nn.Module, params: Mapping[str, torch.Tensor], ema, optimizer,
                    scaler) -> None:
    """Load a sharded state into the sharded module, its AdamW and EMA on any number of processes
    (DCP reshards), and the loss scale; ResumeMismatch for a state of one file (a run without fsdp)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if header.shards is None:
        raise ResumeMismatch(f"cannot resume from {header.path!r} with fsdp: it was written without fsdp (one file "
                             "with the whole state); resume it without fsdp (DDP, --shard-optimizer for less memory), "
                             "or delete it / choose another name to start over")
    if list(params) != header.params:
        raise ResumeMismatch(f"cannot resume from {header.path!r}: its trainable parameters differ from this model's; "
                             "was it made for another base model?")
    folder = os.path.join(os.path.dirname(os.path.abspath(header.path)), header.shards)
    if not os.path.isdir(folder):
        raise ResumeMismatch(f"cannot resume from {header.path!r}: its shards folder {folder!r} is missing (it must be "
                             "on a filesystem every process can read); restore it, or delete the state to start over")
    state = _state(module, optimizer, ema)
    dcp.load(state, checkpoint_id=folder)  # into this run's shards: each rank reads the parts it needs
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    restore_scaler(header, scaler)
