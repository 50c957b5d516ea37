"""TrainConfig: a run's options, their validation, and what a state file records of them.

TrainConfig.validate() refuses a bad value with a ValueError naming the field and what it should
be (and an ImportError for the 8-bit optimizer without bitsandbytes) before anything is read or
written; cuda_graph_reason says why this process cannot have the CUDA-graph option.

A state file records the run's config (`run_config`): the options that change the math, the
images, the VAE, the base's shapes, the schedule and how batches are drawn (SAMPLER, plan.py).
A resumed run must agree with it, except for RESUMABLE_CHANGES (speed and bookkeeping, and
gradient_accumulation: how a step's batch is split, not what it is) and ADJUSTABLE_ON_RESUME (e.g. a
lower lr or another precision after a NaN loss; the change is logged). Options added since a state
file format began (optimizer, validation_share) are recorded only when not at their default, so
older state files resume as they were.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import ranks
from .latents import LatentSet
from .noise import DiscreteSchedule, FlowSchedule
from .trainable import MODES

try:  # inside the pack (ComfyUI imports it as a package)
    from ..lora_hooks import DEFAULT_TARGETS
except ImportError:  # `training` imported as a top-level package (tools/, tests/: the repo root on sys.path)
    from lora_hooks import DEFAULT_TARGETS

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the node offers them in this order
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
# Options that change speed or bookkeeping, not the math: a run may be resumed with other values.
# gradient_accumulation splits each step's global batch into micro-batches: the same images, noise
# and mean loss (the gradient up to float rounding), as another number of processes does.
# fsdp and cpu_offload change where the weights live, not the math; a state written with fsdp is in
# parts (sharded.py): it resumes with fsdp on any number of processes, and a state of one file without.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "preview_every", "gradient_checkpointing", "compile", "shard_optimizer",
                     "cuda_graph", "gradient_accumulation", "fsdp", "cpu_offload")
# Options that change the math of the steps still to run but may change on resume (e.g. a lower lr or
# another precision after a NaN loss): recorded in the state, a change is logged.
ADJUSTABLE_ON_RESUME = ("lr", "lr_schedule", "warmup_steps", "precision")
SAMPLER = "epoch/1"  # how batches are drawn (plan.py; run_config's "sampler"; states of 0.3.0 have none)


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
    batch_size: int = 1  # the global batch: images per optimizer update (over every process and micro-batch)
    gradient_accumulation: int = 1  # micro-batches per update, each of batch_size / gradient_accumulation images
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
    validation_share: float = 0.0  # images held out of training, their loss measured at each checkpoint (validation.py)
    fsdp: bool = False  # full mode: weights, gradients and AdamW states sharded over the processes (FSDP2, sharded.py)
    cpu_offload: bool = False  # with fsdp: the shards, gradients and AdamW states in CPU memory (one GPU, large models)

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
        need(self.gradient_accumulation >= 1, "gradient_accumulation", "an integer >= 1 (1: one micro-batch per step)")
        need(self.batch_size % self.gradient_accumulation == 0, "batch_size",
             f"a multiple of gradient_accumulation={self.gradient_accumulation} (batch_size is the global batch: each "
             f"step accumulates {self.gradient_accumulation} micro-batches of batch_size / {self.gradient_accumulation} images)")
        need(0.0 <= self.validation_share < 1.0, "validation_share", "a share in [0, 1) of the images (0 = no validation)")
        need(self.resolution >= 64 and self.resolution % 64 == 0, "resolution", "a multiple of 64 (e.g. 512 or 1024)")
        need(self.precision in PRECISIONS, "precision", f"one of {tuple(PRECISIONS)}")
        need(0.0 <= self.ema_decay < 1.0, "ema_decay", "a number in [0, 1) (0 = no EMA)")
        need(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        need(self.preview_every >= 0, "preview_every", "an integer >= 0")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        if self.cuda_graph and self.gradient_accumulation > 1:
            raise ValueError(f"cuda_graph=True with gradient_accumulation={self.gradient_accumulation}: use one or the other "
                             "(a recorded step zeroes the gradients it computes; set gradient_accumulation 1, or a "
                             "batch_size that fits, for the graphs)")
        if self.cuda_graph and (self.precision == "fp16" or self.compile):
            raise ValueError(f"cuda_graph=True with {'precision fp16 (its loss scaling)' if self.precision == 'fp16' else 'compile'}: "
                             "use one or the other (cuda_graph works with bf16 or fp32, not compiled)")
        self._validate_fsdp()
        if self.optimizer == "adamw8bit":
            bitsandbytes_available()  # before anything is read or written
            if self.shard_optimizer:
                raise ValueError("optimizer='adamw8bit' with shard_optimizer: use one or the other (ZeroRedundancyOptimizer "
                                 "does not gather bitsandbytes' 8-bit states)")


    def _validate_fsdp(self) -> None:
        """The options fsdp does not go with, each refused with the reason (sharded.py)."""
        from .sharded import EIGHT_BIT_REFUSAL

        if self.cpu_offload and not self.fsdp:
            raise ValueError("cpu_offload=True needs fsdp=True (it offloads FSDP's shards)")
        if not self.fsdp:
            return
        refusals = [
            (self.mode != "full", "mode='lora' with fsdp: fsdp shards a full copy; a LoRA's adapters are small and the "
                                  "host's frozen base is not trained: use mode lora without fsdp (DDP)"),
            (self.shard_optimizer, "shard_optimizer with fsdp: use one or the other (fsdp shards the optimizer's states "
                                   "already, with the weights and gradients)"),
            (self.optimizer == "adamw8bit", EIGHT_BIT_REFUSAL),
            (self.cuda_graph, "cuda_graph=True with fsdp: use one or the other (FSDP's collectives run between the "
                              "graphs' kernels; CUDA graphs are for one process)"),
            (self.preview_every > 0, "preview_every with fsdp: the sharded model runs only on every rank together, a "
                                     "preview samples on rank 0 alone; use validation prompts (they sample with the "
                                     "gathered weights), or preview_every 0"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(why)


def memory_savers(config: TrainConfig, cli: bool = False) -> list[str]:
    """What lowers the run's peak memory, in the order to try them: first what trains the same
    (activations recomputed, full mode's graph pool let go, the batch in micro-batches), then what
    changes it (8-bit AdamW states, precision, LoRA, resolution). By the node's input names, or
    (cli) the headless trainer's options. What the run already does is left out; each step assumes
    the ones before it."""
    def say(node: str, option: str) -> str:
        return option if cli else node

    out = []
    if not config.gradient_checkpointing:
        out.append(say("turn on gradient_checkpointing", "leave out --no-gradient-checkpointing"))
    if config.mode == "full" and config.cuda_graph:
        out.append(say("turn off cuda_graphs", "leave out --cuda-graphs") + " (full mode's graphs keep a memory pool)")
    micro = config.batch_size // config.gradient_accumulation
    if micro > 1:
        k = next(k for k in range(2, micro + 1) if micro % k == 0)  # the smallest split of the micro-batch
        n = config.gradient_accumulation * k
        out.append(say(f"gradient_accumulation {n}", f"--gradient-accumulation {n}")
                   + f" (the same batch in micro-batches of {micro // k} image{'s' if micro // k > 1 else ''})")
    if config.mode == "full" and config.optimizer == "adamw" and not config.fsdp:
        out.append(say("optimizer adamw8bit", "--optimizer adamw8bit") + " (2 instead of 8 bytes of optimizer state per parameter)")
    if config.fsdp and not config.cpu_offload:
        out.append("--cpu-offload (the shards and optimizer states in CPU memory)")
    if config.precision == "fp32":
        out.append(say("training_dtype bf16", "--training-dtype bf16"))
    if config.mode == "full" and not config.fsdp:
        out.append(say("mode lora", "--mode lora"))
    if config.resolution > 256:
        out.append(say("a lower resolution", "a lower --resolution"))
    return out


def bitsandbytes_available() -> None:
    """ImportError naming the package and how to install it, if bitsandbytes cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("optimizer 'adamw8bit' needs the bitsandbytes package, which is not installed: "
                          "pip install bitsandbytes (in the Python that runs ComfyUI), or choose optimizer 'adamw'")


def run_config(config: TrainConfig, data: LatentSet, vae_id: str, prediction_type: str, unet: nn.Module,
               schedule: DiscreteSchedule | FlowSchedule) -> dict:
    """What a state file must agree on to be resumed: the config's math, the images, the VAE, the base."""
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    if cfg["optimizer"] == "adamw":  # as state files from before the option record it: not at all
        del cfg["optimizer"]
    if not cfg["validation_share"]:  # likewise: without validation, as before the option
        del cfg["validation_share"]
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
