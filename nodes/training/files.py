"""What Train Domain UNet writes, and where (nodes/folders.py), each file written atomically by
training.save_model_file / atomic_save:

    loras/<save_name>.safetensors             a LoRA domain, rewritten at every checkpoint
    diffusion_models/<save_name>.safetensors  a full-copy domain (folders.kind_folder: models/loras and
                                              models/diffusion_models, not the legacy models/unet)
    <save_name>.indomain-state                next to it: the training state (weights, AdamW, EMA,
                                              step), for resume
    domain_unets/.latent-cache/<sha256>.latent  VAE latents, reused by every run on the same images and VAE

A save name that already has a file in the pack's own domain_unets folder (trained before 0.3.0)
is written there still, so its run resumes. None of these extensions but the first is listed by
the host's model pickers. The model file's metadata records how it was trained (file_metadata).
"""
from __future__ import annotations

import json
import os
import re
import time

import safetensors

import folder_paths

from ...training import TrainConfig, safe_join, save_model_file
from ...training.checkpoint import deliverable
from ..folders import FOLDER, is_inside, kind_folder, own_folders
from .inputs import HostModel

STATE_EXTENSION = ".indomain-state"
CACHE_FOLDER = ".latent-cache"
FILE_FORMAT = "indomain-domain-unet/1"


def cache_folder() -> str:
    """The latent cache: a hidden folder in the pack's first domain_unets folder."""
    folder = os.path.join(own_folders()[0], CACHE_FOLDER)
    os.makedirs(folder, exist_ok=True)
    return folder


def check_file_name(save_name: str) -> None:
    """ValueError unless the save name's last part is a plain file name: not empty, not only dots,
    not starting with '.' (a hidden file). Subfolders ('faces/v1') are fine."""
    last = re.split(r"[/\\]", save_name)[-1].strip()
    if not last.strip(".") or last.startswith("."):
        raise ValueError(f"save name {save_name!r} does not end in a plain file name (its last part is {last!r}); "
                         "give a name such as 'my_domain' or 'faces/v1'")


def output_paths(save_name: str, mode: str) -> tuple[str, str]:
    """(model file, state file) for a save name and training mode: in the host's loras (LoRA) or
    diffusion_models (full) folder, never outside it; in the pack's own folder where the name has a
    file there from before. Refused when Load Domain UNet lists another file under the same name,
    or when the file exists and this pack did not write it (a user's own LoRA or model)."""
    save_name = save_name.strip()
    stem, ext = os.path.splitext(save_name)
    if ext.lower() in (".safetensors", ".sft"):
        save_name = stem
    check_file_name(save_name)
    name = save_name + ".safetensors"
    model_path = safe_join(kind_folder(mode), name)
    listed = folder_paths.get_full_path(FOLDER, name)
    if listed and is_inside(listed, own_folders()):
        model_path = os.path.realpath(listed)  # trained before 0.3.0: it stays where its run resumes from
    elif listed and os.path.realpath(listed) != os.path.realpath(model_path):
        raise ValueError(f"save name {save_name!r} is taken: Load Domain UNet already lists {listed} under that "
                         f"name; choose another save_name or remove that file")
    if os.path.exists(model_path) and not written_by_pack(model_path):
        raise ValueError(f"save name {save_name!r}: {model_path} exists and was not written by Train Domain UNet; "
                         "choose another save_name (it would be overwritten)")
    return model_path, os.path.splitext(model_path)[0] + STATE_EXTENSION


def written_by_pack(path: str) -> bool:
    """True for a domain file this pack wrote (its metadata names the format)."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("indomain.format") == FILE_FORMAT
    except Exception:  # unreadable: not ours to overwrite
        return False


def pack_version() -> str:
    """The pack's version, from pyproject.toml (the one place it is written)."""
    pack = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # <pack>/nodes/training/files.py
    path = os.path.join(pack, "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def file_metadata(host: HostModel, config: TrainConfig, step: int, image_count: int, base_fp: str) -> dict[str, str]:
    """How the file was trained: the format, the pack's version, the base (its architecture, prediction
    type and fingerprint), the settings, the step and the number of images."""
    return {
        "indomain.format": FILE_FORMAT,
        "indomain.pack_version": pack_version(),
        "indomain.mode": config.mode,
        "indomain.architecture": host.architecture,
        "indomain.prediction_type": host.prediction_type,
        "indomain.base_fingerprint": base_fp,
        "indomain.steps": str(step),
        "indomain.learning_rate": repr(config.lr),
        "indomain.lr_schedule": config.lr_schedule,
        "indomain.batch_size": str(config.batch_size),
        "indomain.resolution": str(config.resolution),
        "indomain.image_count": str(image_count),
        "indomain.ema_decay": repr(config.ema_decay),
        "indomain.lora": json.dumps({"rank": config.lora_rank, "alpha": config.lora_alpha}) if config.mode == "lora" else "",
        "indomain.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class ModelFile:
    """The loop's on_checkpoint: each checkpoint's weights written as the model file at `path`, its
    metadata (file_metadata) counting the images the cache stage reported to count_images (an on_progress)."""

    def __init__(self, path: str, host: HostModel, config: TrainConfig, base_fp: str):
        self.path, self.host, self.config, self.base_fp, self.images = path, host, config, base_fp, 0

    def count_images(self, p) -> None:
        if p.stage == "cache":
            self.images = p.step

    def __call__(self, step: int, weights: dict) -> None:
        save_model_file(self.path, deliverable(weights, self.config, self.host.storage),
                        file_metadata(self.host, self.config, step, self.images, self.base_fp))


def kept_message(state_path: str, message: str) -> str:
    if os.path.exists(state_path):
        return f"{message}. The last checkpoint {os.path.basename(state_path)} is kept."
    return f"{message}. No checkpoint had been written yet."


