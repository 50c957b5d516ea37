"""The host's memory management, told of the CUDA graphs the pack keeps (cudagraph.OWNER).

ComfyUI frees memory in one place: comfy.model_management.free_memory, which every model load
calls with the bytes it needs, and unload_all_models (the "Unload models" button, the API's
/free) calls with more than any card has. Wrapped here, once per process, so that:
- when the host lacks the memory it asks for, the graphs go first (a capture costs tens of
  milliseconds; reloading a model, seconds): every graph on that device is released and CUDA's
  graph memory trimmed, before the host unloads any model;
- after it, the graphs of the models it unloaded go too (what it returns). Not those of models
  missing from its list at the time: load_models_gpu takes a model it reloads off the list around
  its own free_memory call.
The wrapper calls the host's own function with the same arguments and returns what it returns.

Also here: the host's Cancel (InterruptProcessingException) is registered as an interrupt, so a
Cancel that lands during a capture stops the run (cudagraph.is_interrupt); and the host's
--disable-cuda-graphs flag, which sampling and training both honour (host_flag_reason).
"""
from __future__ import annotations

import functools
import logging

import torch

import comfy.model_management as mm

from ..cudagraph import OWNER, register_interrupt

log = logging.getLogger(__name__)

_MARK = "_indomain_releases_graphs"
_EVERYTHING = 1e29  # unload_all_models asks for 1e30 bytes


def install() -> None:
    """Registers the host's Cancel and wraps its free_memory (idempotent)."""
    register_interrupt(mm.InterruptProcessingException)
    if getattr(mm.free_memory, _MARK, False):
        return
    original = mm.free_memory

    @functools.wraps(original)
    def free_memory(memory_required, device, *args, **kwargs):
        release_if_short(memory_required, device)
        try:
            unloaded = original(memory_required, device, *args, **kwargs)
        except IndexError:
            # The host's walk of its loaded models by index, while unloading one lets the garbage collector
            # drop another from that list (ComfyUI issue 14365, seen on 0.33): the list is shorter now, again
            log.info("free_memory: the host's list of loaded models shrank while it walked it; walking it again")
            unloaded = original(memory_required, device, *args, **kwargs)
        models = [lm.model.model for lm in unloaded or () if getattr(lm, "model", None) is not None]
        if models:  # the graphs of the models it unloaded go with them
            OWNER.sweep(lambda model: not any(model is m for m in models))
        return unloaded

    setattr(free_memory, _MARK, True)
    mm.free_memory = free_memory


def release_if_short(memory_required, device) -> int:
    """Releases the graphs on `device` when the host asks for more than is free (or for all of it);
    returns the bytes they held."""
    if not isinstance(device, torch.device) or device.type != "cuda" or not OWNER.held(device):
        return 0
    if memory_required < _EVERYTHING and mm.get_free_memory(device) >= memory_required:
        return 0
    why = "ComfyUI unloads its models" if memory_required >= _EVERYTHING else \
        f"ComfyUI needs {memory_required / 2**30:.2f} GiB"
    return OWNER.release(device, why)


def host_flag_reason() -> str | None:
    """Why the user asked for no CUDA graphs (None: they did not): newer ComfyUI's
    --disable-cuda-graphs, which its own graphs honour too."""
    from comfy.cli_args import args

    return "ComfyUI was started with --disable-cuda-graphs" if getattr(args, "disable_cuda_graphs", False) else None
