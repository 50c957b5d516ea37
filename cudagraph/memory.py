"""CUDA's graph memory, which neither torch's nor the host's accounting sees.

Under cudaMallocAsync (ComfyUI's default allocator on NVIDIA) the allocations a graph captures
come from CUDA's own pool for graphs, not from torch's: `torch.cuda.memory_reserved()` does not
count them, and what a destroyed graph gave back stays reserved for graphs until
cuDeviceGraphMemTrim hands it to the rest of the process. Read and trimmed here through the
driver API (libcuda, present wherever CUDA runs), so no CUDA toolkit library is needed.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)

# CUgraphMem_attribute (cuda.h)
USED_MEM_CURRENT, USED_MEM_HIGH, RESERVED_MEM_CURRENT, RESERVED_MEM_HIGH = 0, 1, 2, 3


@functools.lru_cache(maxsize=1)
def _driver():
    """libcuda with the graph-memory calls typed, or None (no NVIDIA driver: a CPU-only process)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        for name in ("cuDeviceGet", "cuDeviceGetGraphMemAttribute", "cuDeviceGraphMemTrim"):
            getattr(lib, name).restype = ctypes.c_int
        return lib
    except (OSError, AttributeError) as e:
        log.debug("CUDA driver API not available (%s): graph memory is not read", e)
        return None


def _cu_device(device: torch.device):
    lib = _driver()
    if lib is None or device.type != "cuda" or not torch.cuda.is_available():
        return lib, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()  # the driver must be initialised before cuDeviceGet
    handle = ctypes.c_int()
    return lib, (handle if lib.cuDeviceGet(ctypes.byref(handle), index) == 0 else None)


def graph_memory(device: torch.device, attribute: int = USED_MEM_CURRENT) -> int:
    """Bytes of CUDA's graph memory on `device` (USED_MEM_CURRENT: held by live graphs' allocations;
    RESERVED_MEM_CURRENT: also what freed graphs left for later graphs). 0 where it cannot be read."""
    lib, dev = _cu_device(device)
    if dev is None:
        return 0
    value = ctypes.c_uint64()
    if lib.cuDeviceGetGraphMemAttribute(dev, ctypes.c_int(attribute), ctypes.byref(value)) != 0:
        return 0
    return int(value.value)


def trim_graph_memory(device: torch.device) -> int:
    """Gives CUDA's unused graph memory on `device` back (cuDeviceGraphMemTrim); returns the bytes
    it freed (the drop in RESERVED_MEM_CURRENT). Synchronises the device first: the trim keeps
    memory that a graph still in flight uses."""
    lib, dev = _cu_device(device)
    if dev is None:
        return 0
    torch.cuda.synchronize(device)
    before = graph_memory(device, RESERVED_MEM_CURRENT)
    if lib.cuDeviceGraphMemTrim(dev) != 0:
        return 0
    return max(0, before - graph_memory(device, RESERVED_MEM_CURRENT))
