"""Run in a fresh process by tests/test_training_graphs.py (GPU tier), under the allocator that
PYTORCH_CUDA_ALLOC_CONF names: graphs let go four ways, each part after a mark on stderr ("=== name"):
a plain `del` (the control), cudagraph.release_graph, a cudagraph.Graph (what sampling and
training hold) released by its owner and training's GraphedSteps closed and going out of scope. The test reads which parts
of stderr carry cudaMallocAsync's "uncaptured free of a captured allocation". Prints one JSON line."""
import gc
import json
import os
import sys

import torch

from cudagraph import OWNER, capture_graph, release_graph  # noqa: E402
from training.graphed import GraphedSteps  # noqa: E402

dev = torch.device("cuda")
x = torch.ones(1024, device=dev)


def mark(name: str) -> None:
    gc.collect()
    torch.cuda.synchronize()
    sys.stderr.flush()
    print(f"=== {name}", file=sys.stderr, flush=True)


mark("plain del")
graph, out, _ = capture_graph(lambda: x * 2, dev)
graph.replay()
del graph, out
mark("release_graph")
graph, out, _ = capture_graph(lambda: x * 3, dev)
graph.replay()
release_graph(graph, out)
del graph, out
mark("Graph")
sampled = OWNER.capture("test", lambda a, t: a * t, [x, torch.ones(1, device=dev)], dev)
result = sampled(x, torch.full((1,), 4.0, device=dev))
OWNER.release(dev)
del sampled
mark("GraphedSteps")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x_t, timestep):
        return self.lin(x_t) * timestep[:, None]


model = Tiny().to(dev)
steps = GraphedSteps(model, list(model.parameters()), None)
x_t, t, target = torch.randn(2, 8, device=dev), torch.ones(2, device=dev), torch.zeros(2, 8, device=dev)
losses = [float(steps(x_t, t, target, {})) for _ in range(4)]
captured = len(steps.graphs)
steps.close()
del steps
mark("end")
print(json.dumps({"allocator": torch.cuda.memory.get_allocator_backend(), "sampled": result[:2].tolist(),
                  "captured": captured, "losses": losses}))
