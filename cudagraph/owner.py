"""The one owner of every CUDA graph the pack captures (sampling and training).

A graph is worth keeping while it pays: a second run with the same model, weights, conditioning
and shapes replays the graphs of the first without capturing again. It is not worth a byte the
host needs. So the owner:

- finds a graph by a key (what its replays read: model, shapes, dtypes) and a check of the rest
  (the weights' identity, the conditioning's values), and counts captures and reuses;
- keeps, after a run (settle), at most `limit_bytes` per device, least recently used first out
  (INDOMAIN_GRAPH_CACHE_GIB; default a tenth of the card; 0 keeps none past its run);
- lets go of everything on a device when the host frees memory it lacks or unloads its models
  (release, called from the host's own free-memory path: nodes/host_memory.py), of a model's
  graphs when that model is gone (sweep), and trims CUDA's graph memory after each release
  (memory.trim_graph_memory), so that what it held is free memory again.

A graph released while a run holds it stops being `alive`; the run calls the model directly
for the rest of its steps.
"""
from __future__ import annotations

import collections
import logging
import os
import time
import weakref
from typing import Callable, Hashable

import torch

from .capture import capture_graph, clear_workspaces, cuda_malloc_async, release_graph
from .memory import USED_MEM_CURRENT, graph_memory, trim_graph_memory

log = logging.getLogger(__name__)

ENV = "INDOMAIN_GRAPH_CACHE_GIB"
DEFAULT_SHARE = 0.10  # of the card's memory, kept for graphs between runs


def held_memory(device: torch.device) -> int:
    """The memory graphs can hold on `device`: CUDA's graph memory in use under cudaMallocAsync,
    torch's reserved memory (which holds its graph pools) under the native allocator."""
    if device.type != "cuda":
        return 0
    return graph_memory(device, USED_MEM_CURRENT) if cuda_malloc_async() else torch.cuda.memory_reserved(device)


class Graph:
    """fn(*inputs) captured once (capture.capture_graph); each call copies new inputs into the
    static copies it read and replays it. `holds`: whatever else the replays read (conditioning on
    the device, LoRA casts), kept alive with the graph. `model`: the object whose weights it reads
    (weakly: the graph goes when the model does)."""

    def __init__(self, fn, inputs: list[torch.Tensor], device: torch.device, pool=None,
                 peak_bytes: int | None = None, holds=(), model=None):
        self.inputs = [t.clone() for t in inputs]
        self.holds, self.device = holds, device
        self.model = weakref.ref(model) if model is not None else None
        before = held_memory(device)
        t0 = time.perf_counter()
        self.graph, self.out, self.pool = capture_graph(lambda: fn(*self.inputs), device, pool, peak_bytes)
        self.capture_ms = round(1e3 * (time.perf_counter() - t0), 1)
        self.nbytes = max(0, held_memory(device) - before) + sum(t.nbytes for t in self.inputs)

    @property
    def alive(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.graph.replay()
        return self.out.clone()  # the captured output stays the graph's (release_graph)

    def release(self) -> None:
        if getattr(self, "graph", None) is not None:
            graph, out, self.graph, self.out = self.graph, self.out, None, None
            release_graph(graph, out)
            self.holds = ()

    __del__ = release


class GraphOwner:
    """Every graph of the process, by key (see module docstring)."""

    def __init__(self):
        self.graphs: collections.OrderedDict[Hashable, tuple[Graph, bool]] = collections.OrderedDict()
        self.pools: dict[torch.device, object] = {}
        self.captures = 0  # graphs captured in this process
        self.reuses = 0  # graphs found for a later run

    def capture(self, key: Hashable, fn, inputs: list[torch.Tensor], device: torch.device, peak_bytes=None,
                holds=(), model=None, keep: bool = True) -> Graph:
        """fn captured as a Graph under `key` (one shared pool per device: replayed one at a time);
        keep=False: released when the run settles, never reused."""
        self.discard(key)
        graph = Graph(fn, inputs, device, self.pools.get(device), peak_bytes, holds, model)
        self.pools[device] = graph.pool
        self.graphs[key] = (graph, keep)
        self.captures += 1
        return graph

    def find(self, key: Hashable, matches: Callable[[Graph], bool] = lambda g: True) -> Graph | None:
        """The live graph under `key` whose model is alive and for which matches(graph) holds; one
        that fails is released."""
        entry = self.graphs.get(key)
        if entry is None:
            return None
        graph = entry[0]
        if not graph.alive or (graph.model is not None and graph.model() is None) or not matches(graph):
            self.discard(key)
            return None
        self.graphs.move_to_end(key)
        self.reuses += 1
        return graph

    def discard(self, key: Hashable) -> None:
        entry = self.graphs.pop(key, None)
        if entry is not None:
            entry[0].release()
        if not self.graphs:
            self.pools.clear()

    def held(self, device: torch.device | None = None) -> int:
        """Bytes the live graphs hold (on `device`, or on every device)."""
        return sum(g.nbytes for g, _ in self.graphs.values() if g.alive and (device is None or same_device(g.device, device)))

    def release(self, device: torch.device | None = None, why: str = "") -> int:
        """Every graph (on `device`) released and CUDA's graph memory trimmed; returns the bytes the
        graphs held."""
        keys = [k for k, (g, _) in self.graphs.items() if device is None or same_device(g.device, device)]
        return self.drop(keys, why)

    def sweep(self, keep_model: Callable[[object], bool]) -> int:
        """Releases the graphs kept between runs whose model is gone or for which keep_model(model)
        is False (the host unloaded it); a run's own graphs (keep=False) stay until it settles."""
        def gone(g: Graph, keep: bool) -> bool:
            model = g.model() if g.model is not None else None
            return not g.alive or (keep and g.model is not None and (model is None or not keep_model(model)))
        return self.drop([k for k, (g, keep) in self.graphs.items() if gone(g, keep)], "their model was unloaded")

    def settle(self, device: torch.device, kind: str = "sampling") -> int:
        """After a run of `kind` (a key's first element): releases that kind's graphs not kept, then
        the least recently used of those kept until those on `device` fit limit_bytes(device). Another
        kind's run-only graphs are that run's (a training run whose validation samples settle here):
        they stay, and are not counted against the bound."""
        drop = [k for k, (g, keep) in self.graphs.items() if not keep and _kind(k) == kind]
        kept = [k for k, (g, keep) in self.graphs.items() if keep]
        held = sum(self.graphs[k][0].nbytes for k in kept if same_device(self.graphs[k][0].device, device))
        limit = limit_bytes(device)
        for k in kept:
            if held <= limit:
                break
            g = self.graphs[k][0]
            if same_device(g.device, device):
                drop.append(k)
                held -= g.nbytes
        return self.drop(drop, f"over the {limit / 2**30:.2f} GiB kept between runs ({ENV})" if drop else "")

    def drop(self, keys: list, why: str = "") -> int:
        """Releases the graphs under `keys` and trims the memory they held; returns its bytes."""
        keys = [k for k in keys if k in self.graphs]
        if not keys:
            return 0
        devices = {self.graphs[k][0].device for k in keys}
        freed = sum(self.graphs[k][0].nbytes for k in keys if self.graphs[k][0].alive)
        for k in keys:
            self.discard(k)
        if not self.graphs and any(d.type == "cuda" for d in devices):
            clear_workspaces()  # no graph reads them any more (capture.capture_stream)
        for device in devices:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                if cuda_malloc_async():
                    trim_graph_memory(device)
        log.info("CUDA graphs: %d released (%.2f GiB)%s", len(keys), freed / 2**30, f": {why}" if why else "")
        return freed


def _kind(key: Hashable):
    """What captured a graph: its key's first element ("sampling", "training")."""
    return key[0] if isinstance(key, tuple) and key else key


def weight_addresses(module: torch.nn.Module) -> list[int]:
    """Where a module's parameters and buffers are: what a graph of it reads (a weight moved or
    replaced by a new tensor changes the list)."""
    return [t.data_ptr() for t in module.parameters()] + [t.data_ptr() for t in module.buffers()]


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:N name the same card when N is the current one."""
    def index(d):
        return d.index if d.index is not None or d.type != "cuda" or not torch.cuda.is_available() else torch.cuda.current_device()
    return a.type == b.type and index(a) == index(b)


def limit_bytes(device: torch.device) -> int:
    """The bytes of graphs kept between runs on `device`: INDOMAIN_GRAPH_CACHE_GIB, else a tenth of
    the card's memory."""
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            return max(0, int(float(value) * 2**30))
        except ValueError:
            log.warning("%s=%r is not a number of GiB; using the default", ENV, value)
    if device.type != "cuda":
        return 0
    return int(DEFAULT_SHARE * torch.cuda.get_device_properties(device).total_memory)


OWNER = GraphOwner()
