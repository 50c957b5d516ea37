"""Which model's weights stay on the device when the base and its full-copy domains do not all fit.

The host loads the base and a full-copy domain together (prepare_sampling: load_models_gpu of the
base and the models its conditioning carries) and, short of memory, partially: the first model
loaded takes the room there is, the other keeps its weights in CPU RAM and copies them to the
device layer by layer in every forward (low VRAM: comfy_cast_weights). Which one comes first is
the order of a Python set of the models: either one, from run to run.

What a step copies is each model's streamed weights times its calls in the step. The base is
called at least as often as any domain: on every model evaluation with a term on (the domain only
at the steps of its term, its interval, domain_every), more than once where the host splits its
rows for memory, and alone where no term is on. So its weights are the ones to keep: base_first
moves the device's room from the domains to the base before the run (the host's own
partially_unload / partially_load, once), never the other way. Not under dynamic VRAM (newer
ComfyUI), where the host pages weights in per layer itself.
"""
from __future__ import annotations

import logging

from .. import dynamic_vram

log = logging.getLogger(__name__)

MB = 1024 * 1024


def base_first(base, domains: list) -> int:
    """Move device room from the full-copy domains' resident weights to the base's streamed ones
    (base, domains: the host's ModelPatchers, loaded for the run). Returns the bytes moved."""
    if dynamic_vram.patcher_is_dynamic(base) or any(dynamic_vram.patcher_is_dynamic(d) for d in domains):
        return 0
    missing = base.model_size() - base.loaded_size()
    moved = 0
    for domain in domains:
        if missing <= 0:
            break
        if domain is base or domain.load_device != base.load_device or domain.loaded_size() <= 0:
            continue
        freed = domain.partially_unload(domain.offload_device, min(missing, domain.loaded_size()))
        if freed <= 0:
            continue
        loaded = base.partially_load(base.load_device, freed)
        moved += loaded
        missing -= loaded
    if moved:
        log.info("low VRAM: %.1f MB of the domain's weights streamed instead of the base's (the base is called "
                 "at least as often); base %.1f of %.1f MB resident", moved / MB, base.loaded_size() / MB,
                 base.model_size() / MB)
    return moved
