"""ComfyUI node classes: thin adapters from host objects to guidance/ and training/."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import host_memory
from .loader_node import DomainUNetLoader
from .sampling import DomainGuiderNode, DomainKSampler, DomainTermNode
from .train_node import DomainTrainer

host_memory.install()  # the host's Cancel and free-memory path know the pack's CUDA graphs

NODES: list[type[io.ComfyNode]] = [DomainUNetLoader, DomainKSampler, DomainGuiderNode, DomainTermNode, DomainTrainer]


class InDomainExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
