"""Run in a fresh process by tests/test_training_graphs.py (GPU tier), under the allocator that
PYTORCH_CUDA_ALLOC_CONF names: three captures that fail (a host synchronisation inside, after
allocating 2 GiB in the capture's pool), then what must still work. Prints one JSON line."""
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


def fails():
    scratch = [torch.empty(256, 1024, 1024, device=dev) for _ in range(2)]  # 2 GiB in the pool
    return x * float(scratch[0].sum())  # a host synchronisation: the capture is invalidated


try:
    capture_graph(lambda: x * 2, dev)
except RuntimeError as e:  # refused under cudaMallocAsync, before capturing
    print(json.dumps({"allocator": torch.cuda.memory.get_allocator_backend(), "refused": str(e)}))
    sys.exit(0)
start = reserved()
errors = []
for _ in range(3):
    try:
        capture_graph(fails, dev)
    except Exception as e:  # noqa: BLE001  (the point is what is left after it)
        errors.append(type(e).__name__)
after_failures = reserved()
graph, out, pool = capture_graph(lambda: x * 2 + 1, dev)
x.fill_(3.0)
graph.replay()
noise = torch.randn(4, device=dev)  # the random generator outside a capture
print(json.dumps({"allocator": torch.cuda.memory.get_allocator_backend(), "refused": None, "errors": errors,
                  "reserved_growth": after_failures - start, "replayed": out.tolist()[:2],
                  "noise_finite": bool(torch.isfinite(noise).all())}))
