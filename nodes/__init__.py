"""ComfyUI node classes: thin adapters from host objects to guidance/ and training/.

Here, one file per job: the node classes (loader_node.py, sampler_nodes.py, train_node.py,
extract_node.py), what they declare alike (host_schema.py), and the host glue both runtimes share
(folders.py, domain_files.py, paper_format.py, dynamic_vram.py, host_memory.py). The runtimes
behind the nodes: sampling/ (the guider and its fast path) and training/ (run_training and its
adapters)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host_memory
from .extract_node import DomainLoRAExtractor
from .loader_node import DomainUNetLoader
from .sampler_nodes import DomainGuiderNode, DomainKSampler, DomainTermNode
from .train_node import DomainTrainer

host_memory.install()  # the host's Cancel and free-memory path know the pack's CUDA graphs

NODES: list[type[io.ComfyNode]] = [DomainUNetLoader, DomainKSampler, DomainGuiderNode, DomainTermNode, DomainTrainer,
                                   DomainLoRAExtractor]


class InDomainExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
