"""What train() reports and returns: Progress (each encoded image, step and validation loss), the
TrainResult, and TrainingDiverged (a non-finite loss or weight)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Progress:
    stage: str  # "cache" (encoding latents: step = images done), "train" (step = updates done) or
    #             "validation" (loss: the held-out images' loss after `step` updates; speed and eta 0)
    step: int
    total: int
    loss: float | None  # this step's loss (train: the mean over the global batch), or the validation loss
    images_per_s: float
    eta_s: float
    lr: float | None = None  # train: the learning rate of this update


@dataclass
class TrainResult:
    weights: dict[str, torch.Tensor]  # deliverable: full UNet state dict (UNet keys) or ComfyUI LoRA tensors
    ema_weights: dict[str, torch.Tensor] | None  # the same for the EMA weights (None without EMA)
    losses: list[float] = field(default_factory=list)  # one per step run in this call
    step: int = 0  # updates done in total
    start_step: int = 0  # where this call started (the resumed state's step, else 0)
    validation: list[tuple[int, float | None]] = field(default_factory=list)  # (step, loss), resumed runs' too


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite; the state file keeps its last good content."""

    def __init__(self, step: int, what: str, state_path: str | None, saved_step: int | None):
        kept = (f"The state file {state_path!r} is unchanged (step {saved_step}); resume from it with a lower lr."
                if saved_step is not None else "No state was saved; start again with a lower lr.")
        super().__init__(f"training diverged at step {step}: {what}. {kept} fp32 or bf16 precision is more stable than fp16.")
        self.step = step

