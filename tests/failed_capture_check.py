"""Run in a fresh process by tests/test_training_graphs.py (GPU tier), under the allocator that
PYTORCH_CUDA_ALLOC_CONF names: four captures that fail, each after allocating 2 GiB in the
capture (.item(), torch.cuda.synchronize(), an Event's synchronize, a copy from pageable memory),
and a graph dropped before it was replayed, then what must still work. Prints one JSON line."""
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.graphed import capture_graph  # noqa: E402

dev = torch.device("cuda")
x = torch.ones(1024, device=dev)


def reserved() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


def failing(wait):
    def fn():
        scratch = [torch.empty(256, 1024, 1024, device=dev) for _ in range(2)]  # 2 GiB in the capture
        y = x * scratch[0][0, 0, :1024]
        wait(y)
        return y
    return fn


def event_wait(_):
    e = torch.cuda.Event()
    e.record()
    e.synchronize()


waits = [lambda y: float(y.sum()), lambda y: torch.cuda.synchronize(), event_wait,
         lambda y: y + torch.ones(1024).to(dev, non_blocking=True)]
start = reserved()
errors = []
for wait in waits:
    try:
        capture_graph(failing(wait), dev)
    except Exception as e:  # noqa: BLE001  (the point is what is left after it)
        errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
dropped, dropped_out, _ = capture_graph(lambda: x * 5, dev)  # a graph dropped before any replay of its own
del dropped, dropped_out  # (under cudaMallocAsync: freed only after it has run, or the process aborts)
after_failures = reserved()
graph, out, pool = capture_graph(lambda: x * 2 + 1, dev)
x.fill_(3.0)
graph.replay()
noise = torch.randn(4, device=dev)  # the random generator outside a capture
print(json.dumps({"allocator": torch.cuda.memory.get_allocator_backend(), "errors": errors,
                  "reserved_growth": after_failures - start, "replayed": out.tolist()[:2],
                  "noise_finite": bool(torch.isfinite(noise).all())}))
