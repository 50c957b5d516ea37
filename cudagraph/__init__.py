"""CUDA graphs for the pack's sampling and training: capture, replay, keep, let go. Pure torch.

Why: at Stable Diffusion sizes a UNet call is thousands of kernel launches, and launching them
costs more CPU time than the GPU's work at small batches (docs/BENCHMARKS.md). A CUDA graph
replays the recorded kernels with one launch.

What a server that runs for hours needs of them, and where each is done:
- capture.py: a capture that fails, or a first replay that fails, never stops the process under
  either of torch's allocators, keeps nothing but the tensors that cannot be freed (and says how
  much), and lets a Cancel through (is_interrupt);
- owner.py: one owner of every graph, which reuses a graph for a later identical run, keeps a
  bounded number of bytes between runs, and lets go of everything when the host needs the memory;
- memory.py: CUDA's graph memory (invisible to torch's statistics), read and trimmed.

The host adapts this in nodes/ (the free-memory hook and the interrupt type: nodes/host_memory.py;
the sampling records: nodes/sampling/fastpath.py); training in training/graphed.py.
"""
from .capture import (capture_graph, capture_stream, clear_workspaces, cuda_malloc_async, is_interrupt, kept_bytes, memory_reason, peak_memory,
                      register_interrupt, release_graph, undo_failed_capture, waits_refused)
from .memory import graph_memory, trim_graph_memory
from .owner import ENV, OWNER, Graph, GraphOwner, held_memory, limit_bytes, weight_addresses

__all__ = ["capture_graph", "capture_stream", "clear_workspaces", "cuda_malloc_async", "is_interrupt", "kept_bytes", "memory_reason", "peak_memory",
           "register_interrupt", "release_graph", "undo_failed_capture", "waits_refused", "graph_memory",
           "trim_graph_memory", "ENV", "OWNER", "Graph", "GraphOwner", "held_memory", "limit_bytes", "weight_addresses"]
