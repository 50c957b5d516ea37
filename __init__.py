"""In-Domain Guidance for ComfyUI: the ComfyUI entry point.

The pure packages `guidance/`, `training/`, `cudagraph/` and `lora_hooks/` import anywhere; the node
classes are imported only when the ComfyUI host is present (this file is then loaded by its
custom-node loader).
"""
import logging

log = logging.getLogger(__name__)

# Served by the host at /extensions/<pack folder>/: docs/<node id>.md are the node library's help
# pages (the front end's info panel fetches /extensions/<pack>/docs/<node id>.md). No scripts.
WEB_DIRECTORY = "./web"

try:
    import folder_paths  # present only inside ComfyUI
except ImportError:  # imported outside the host (e.g. by tools): expose nothing host-bound
    folder_paths = None

if folder_paths is not None:
    # models/domain_unets (and extra_model_paths.yaml's `domain_unets:`), then the host's loras and
    # diffusion_models folders, where training writes: see nodes/folders.py.
    from .nodes.folders import register

    register()
    from .nodes import InDomainExtension

    async def comfy_entrypoint() -> InDomainExtension:
        return InDomainExtension()
