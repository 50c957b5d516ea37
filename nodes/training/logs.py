"""TensorBoard logs of a training run (the node's `tensorboard` input, the headless trainer's
--tensorboard): event files a user opens with `tensorboard --logdir <ComfyUI>/output/indomain_logs`.

Where: output/indomain_logs/<save_name>/, beside output/indomain_previews/<save_name>/. The output
folder holds what a run shows its user (previews, images); the model folders are what loaders
list and are often shared or synced, and an ever-growing log does not belong there.

What (one point per optimizer step, its step number on the x axis): train/loss (the step's mean
over the global batch), train/learning_rate, train/images_per_s; validation/loss at step 0 and each
checkpoint with validation_share; validation/samples, the grid of validation samples of each
checkpoint (samples.py), with validation_prompts; the run's settings once, as text. A resumed run
adds a new event file to the folder and purges what an interrupted run logged after its last
checkpoint (the events from the resumed step on: SummaryWriter's purge_step), so the curves join
without a repeated stretch.

TensorBoard's event files are appended as the run goes (not written atomically, as the state and
model files are): a crash leaves a complete prefix, which TensorBoard reads. The tensorboard
package is optional (pip install tensorboard); `require_tensorboard` names it when missing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import folder_paths

from ...training import TrainConfig, safe_join

log = logging.getLogger(__name__)

LOG_FOLDER = "indomain_logs"


def require_tensorboard() -> None:
    """ImportError naming the package and how to install it, if TensorBoard's writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError as e:
        raise ImportError("tensorboard: logging to TensorBoard needs the tensorboard package, which is not installed "
                          f"({e}): pip install tensorboard (in the Python that runs ComfyUI), or turn tensorboard off") from e


def log_folder(save_name: str) -> str:
    """output/indomain_logs/<save_name> (subfolders of the save name kept; never outside the folder)."""
    stem = save_name.strip()
    if os.path.splitext(stem)[1].lower() in (".safetensors", ".sft"):
        stem = os.path.splitext(stem)[0]
    return safe_join(os.path.join(folder_paths.get_output_directory(), LOG_FOLDER), stem)


class TensorBoardLog:
    """Progress(...) -> scalars in `folder`'s event files. The writer is made at the first training or
    validation report (purging what an earlier run logged from that step on) and closed by close()."""

    def __init__(self, folder: str, config: TrainConfig):
        require_tensorboard()
        self.folder, self.config, self.writer = folder, config, None

    def _open(self, step: int, purge_step: int) -> None:
        """The writer, made at the first thing logged (at `step`): what an earlier run logged here
        from purge_step on is hidden."""
        if self.writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(self.folder, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.folder, purge_step=purge_step, flush_secs=30)
        settings = json.dumps(dataclasses.asdict(self.config), indent=1, default=str)
        self.writer.add_text("settings", "    " + settings.replace("\n", "\n    "), step)  # markdown code block
        log.info("TensorBoard log: %s (tensorboard --logdir %s)", self.folder, os.path.dirname(self.folder))

    def __call__(self, p) -> None:
        if p.stage == "cache":
            return
        # a fresh run's first report is at step 0 (validation) or 1: it hides all an earlier run logged here
        self._open(p.step, 0 if p.step <= 1 else p.step)
        if p.stage == "validation":
            if p.loss is not None:
                self.writer.add_scalar("validation/loss", p.loss, p.step)
            return
        self.writer.add_scalar("train/loss", p.loss, p.step)
        if p.lr is not None:
            self.writer.add_scalar("train/learning_rate", p.lr, p.step)
        self.writer.add_scalar("train/images_per_s", p.images_per_s, p.step)

    def image(self, tag: str, pixels, step: int) -> None:
        """A picture (uint8 [H, W, 3]) at `step`: the validation samples' grid of that checkpoint. Logged
        before any training step (a resumed run's first grid, of the step it resumes from), it
        hides what an earlier run logged after that step, as the first step's report would."""
        self._open(step, step + 1)
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
