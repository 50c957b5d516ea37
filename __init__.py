"""In-Domain Guidance for ComfyUI: the ComfyUI entry point.

The pure packages `guidance/` and `training/` import anywhere; the node classes are imported
only when the ComfyUI host is present (this file is then loaded by its custom-node loader).
"""
import logging
import os

log = logging.getLogger(__name__)

try:
    import folder_paths  # present only inside ComfyUI
except ImportError:  # imported outside the host (e.g. by tools): expose nothing host-bound
    folder_paths = None

DOMAIN_UNETS = "domain_unets"

if folder_paths is not None:
    # models/domain_unets, plus any `domain_unets:` entries of extra_model_paths.yaml (loaded
    # before custom nodes, so they may already be registered): safetensors files only.
    folder_paths.add_model_folder_path(DOMAIN_UNETS, os.path.join(folder_paths.models_dir, DOMAIN_UNETS))
    folder_paths.folder_names_and_paths[DOMAIN_UNETS] = (
        folder_paths.folder_names_and_paths[DOMAIN_UNETS][0], {".safetensors", ".sft"})

    from .nodes import InDomainExtension

    async def comfy_entrypoint() -> InDomainExtension:
        return InDomainExtension()
