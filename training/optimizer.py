"""The optimizer and its learning rate: AdamW (fused on CUDA; ZeroRedundancyOptimizer under
torchrun with `shard_optimizer`; bitsandbytes' 8-bit AdamW with optimizer "adamw8bit"), and the LR
of each update (linear warm-up, then constant or cosine down towards 0).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW: fused kernels on CUDA, foreach elsewhere (and for fsdp's offloaded shards). With fsdp
    `params` are the sharded parameters: each rank's AdamW keeps and updates the states of its shards. sharded (under torchrun): a
    ZeroRedundancyOptimizer, each rank keeping and updating 1/N of the parameters' AdamW state
    (then broadcasting its updated parameters): the same update, N times less optimizer memory.

    optimizer "adamw8bit": bitsandbytes' AdamW8bit, the optimizer of the paper's own recipe
    (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): the same update with
    both moments stored in 8 bits, quantized block by block (2 bytes of state per parameter
    instead of AdamW's 8; tensors under 4096 elements keep 32-bit states)."""
    if config.optimizer == "adamw8bit":  # (TrainConfig.validate has checked that bitsandbytes is there)
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    # fused kernels need the parameters on the GPU: with fsdp's cpu_offload the shards (and the step) are in CPU memory
    kind = {"fused": True} if device.type == "cuda" and not config.cpu_offload else {"foreach": True}
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=config.lr,
                                       weight_decay=config.weight_decay, **kind)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **kind)


def learning_rate(step: int, config: TrainConfig) -> float:
    """The LR of update `step` (1-based): linear warm-up, then constant or cosine down towards 0."""
    if step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps - 1) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr
