"""Run in a fresh process by tests/test_training_graphs.py (GPU tier), under the allocator that
PYTORCH_CUDA_ALLOC_CONF names: four captures that fail, each after allocating 2 GiB in the
capture (.item(), torch.cuda.synchronize(), an Event's synchronize, a copy from pageable memory),
and a graph dropped before it was replayed, then what must still work; then the failures that
reach CUDA or come from outside: a wait CUDA itself refuses (the capture invalidated), a first
replay without the memory it needs, a Cancel inside the capture; then graphs held by the owner
and released. Prints one JSON line."""
import gc
import json
import os

import torch

from cudagraph import OWNER, capture_graph, graph_memory, kept_bytes, register_interrupt  # noqa: E402

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


gc.collect()
torch.cuda.synchronize()
used_before = graph_memory(dev)
held = [OWNER.capture(("check", n), lambda a: a * n + torch.ones(64 << 20, device=dev)[0], [x], dev) for n in range(3)]
replays = [float(g(x)[0]) for g in held]
used_with_graphs = graph_memory(dev)
released = OWNER.release(dev, "check")
gc.collect()
torch.cuda.synchronize()
used_after_release = graph_memory(dev)

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


class Cancel(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


def cancelled(y):
    raise Cancel("Processing interrupted")


def oom_at_first_replay():
    """A graph whose memory (3 GiB) is not there when it first runs: all but 1.5 GiB taken."""
    blocker = torch.empty(max(0, torch.cuda.mem_get_info()[0] - (3 << 29)), dtype=torch.uint8, device=dev)
    try:
        capture_graph(lambda: torch.ones(3 << 28, device=dev) * x[0], dev)
    finally:
        del blocker
        torch.cuda.empty_cache()  # (native: the blocker's memory back to CUDA, for later pools)


register_interrupt(Cancel)
late = {}
for name, attempt in (("cuda_refused", lambda: capture_graph(failing(lambda y: torch._C._cuda_synchronize()), dev)),
                      ("oom_first_replay", oom_at_first_replay),
                      ("cancel", lambda: capture_graph(failing(cancelled), dev))):
    try:
        attempt()
        late[name] = "no error"
    except BaseException as e:  # noqa: BLE001
        late[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
graph2, out2, _ = capture_graph(lambda: x * 2 + 1, dev)  # still captures and replays after those
graph2.replay()

print(json.dumps({"allocator": torch.cuda.memory.get_allocator_backend(), "errors": errors,
                  "reserved_growth": after_failures - start, "replayed": out.tolist()[:2],
                  "noise_finite": bool(torch.isfinite(noise).all()), "late": late, "kept_bytes": kept_bytes(),
                  "after_late": out2.tolist()[:2], "owner_replays": replays, "owner_released": released,
                  "graph_used": [used_before, used_with_graphs, used_after_release],
                  "alive_after_release": [g.alive for g in held]}))
