"""Where domain files live, so that users find them where they look for models:

- a LoRA domain (Train Domain UNet, mode "lora") is written to the host's `loras` folder: the
  host's Load LoRA lists it;
- a full-copy domain (mode "full") is written to the host's `diffusion_models` folder: the host's
  Load Diffusion Model lists it;
- Load Domain UNet lists the pack's own `domain_unets` folder (files of versions before 0.3.0, and
  `domain_unets:` entries of extra_model_paths.yaml), then `loras`, then `diffusion_models`: any
  LoRA or full UNet of the base can be a domain.

The folders are registered once, when the pack loads (after extra_model_paths.yaml).
"""
from __future__ import annotations

import os

import folder_paths

FOLDER = "domain_unets"
KIND_FOLDERS = {"lora": "loras", "full": "diffusion_models"}
EXTENSIONS = {".safetensors", ".sft"}
_own: list[str] = []


def register() -> None:
    """The `domain_unets` folder type: its own folders first (old files keep their names), then the
    host's loras and diffusion_models folders; safetensors files only."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    own = folder_paths.get_folder_paths(FOLDER)
    _own[:] = own
    shared = [p for kind in KIND_FOLDERS.values() for p in folder_paths.get_folder_paths(kind) if p not in own]
    folder_paths.folder_names_and_paths[FOLDER] = (own + list(dict.fromkeys(shared)), set(EXTENSIONS))


def own_folders() -> list[str]:
    """The pack's own domain_unets folders (not the host's loras / diffusion_models)."""
    return list(_own) or folder_paths.get_folder_paths(FOLDER)


def kind_folder(mode: str) -> str:
    """The folder a new domain of this training mode is written to: the first of the host's loras or
    diffusion_models folders named so (the host lists its legacy models/unet before
    models/diffusion_models), else the first of that kind."""
    kind = KIND_FOLDERS[mode]
    paths = folder_paths.get_folder_paths(kind)
    folder = next((p for p in paths if os.path.basename(os.path.normpath(p)) == kind), paths[0])
    os.makedirs(folder, exist_ok=True)
    return folder


def is_inside(path: str, folders: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([os.path.realpath(f), real]) == os.path.realpath(f) for f in folders)
