"""What Train Domain UNet writes, and where: models/domain_unets (or its first folder from
extra_model_paths.yaml), each file written atomically by training.save_model_file / atomic_save:

    <save_name>.safetensors          the domain UNet (full state dict, or a LoRA), rewritten at
                                     every checkpoint
    <save_name>.indomain-state       the training state (weights, AdamW, EMA, step): resume
    .latent-cache/<sha256>.latent    VAE latents, reused by every run on the same images and VAE

None of these extensions but the first is listed by the host's model pickers. The model file's
metadata records how it was trained (file_metadata).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time

import torch

import folder_paths

from ..training import TrainConfig, safe_join
from .domain_files import FOLDER
from .train_inputs import prediction_type

STATE_EXTENSION = ".indomain-state"
CACHE_FOLDER = ".latent-cache"
FILE_FORMAT = "indomain-domain-unet/1"


def domain_folder() -> str:
    """The folder trained files are written to: the first registered domain_unets folder."""
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def check_file_name(save_name: str) -> None:
    """ValueError unless the save name's last part is a plain file name: not empty, not only dots,
    not starting with '.' (a hidden file). Subfolders ('faces/v1') are fine."""
    last = re.split(r"[/\\]", save_name)[-1].strip()
    if not last.strip(".") or last.startswith("."):
        raise ValueError(f"save name {save_name!r} does not end in a plain file name (its last part is {last!r}); "
                         "give a name such as 'my_domain' or 'faces/v1'")


def output_paths(save_name: str) -> tuple[str, str]:
    """(model file, state file) for a save name, inside the domain_unets folder (never outside)."""
    save_name = save_name.strip()
    stem, ext = os.path.splitext(save_name)
    if ext.lower() in (".safetensors", ".sft"):
        save_name = stem
    check_file_name(save_name)
    model_path = safe_join(domain_folder(), save_name + ".safetensors")
    return model_path, os.path.splitext(model_path)[0] + STATE_EXTENSION


@torch.inference_mode()
def fingerprint(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights: every name and shape, and a strided sample of
    every tensor's values (hashing all of an SDXL UNet would take seconds).

    Read in inference mode, without views: the host's weights may be inference tensors, or
    parameters that refuse a view ("Inference tensors do not track version counter")."""
    h = hashlib.sha256()
    for name, t in module.state_dict(keep_vars=True).items():
        picks = torch.arange(0, t.numel(), max(1, t.numel() // 256), device=t.device)[:256]
        sample = torch.take(t, picks).float().cpu()  # no view of t: see train_inputs.make_autograd_safe
        h.update(f"{name}{list(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def pack_version() -> str:
    """The pack's version, from pyproject.toml (the one place it is written)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def file_metadata(model, config: TrainConfig, step: int, image_count: int, base_fp: str) -> dict[str, str]:
    return {
        "indomain.format": FILE_FORMAT,
        "indomain.pack_version": pack_version(),
        "indomain.mode": config.mode,
        "indomain.architecture": type(model.model.model_config).__name__,
        "indomain.prediction_type": prediction_type(model),
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


def deliverable(weights: dict[str, torch.Tensor], config: TrainConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: a full UNet in the base's storage dtype; a LoRA as trained (float32)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float16  # e.g. an fp8-stored base: keep the trained weights in 16 bits
    if config.mode == "full":
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return weights


def kept_message(state_path: str, message: str) -> str:
    if os.path.exists(state_path):
        return f"{message}. The last checkpoint {os.path.basename(state_path)} is kept."
    return f"{message}. No checkpoint had been written yet."


