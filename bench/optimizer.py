"""GPU benchmark: one fused AdamW step on the SD1.5 UNet's parameters, fp32 against bf16.

    python -m bench.optimizer --out DIR

Issue 5 asks whether bf16 master weights or optimizer states would speed up training. The
optimizer step is the only part of a training step they change, so this times that step alone,
on tensors of the SD1.5 UNet's parameter shapes (the host's UNetModel built on the meta device
from its config, then real tensors on the GPU with random gradients):

  fp32        fp32 weights and states (what training.train does: autocast computes in bf16,
              the master weights and AdamW's moments stay fp32)
  bf16        bf16 weights, gradients and states (pure bf16: half the bytes moved)

Median of 20 steps after 5 warm-up steps, torch.cuda.synchronize around each; bytes moved per
step by arithmetic (AdamW reads weight, grad, exp_avg, exp_avg_sq and writes weight and both
moments); peak memory of the tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sd15_shapes() -> list[torch.Size]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from bench.unet_configs import SD15

    with torch.device("meta"):
        model = UNetModel(**SD15, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    return [p.shape for p in model.parameters()]


def time_step(shapes, dtype, steps: int = 20, warmup: int = 5) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=True)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in params)
    size = torch.tensor([], dtype=dtype).element_size()
    moved = n * size * 7  # read w, g, m, v; write w, m, v
    med = statistics.median(times)
    out = {"dtype": str(dtype), "params": n, "median_ms": round(1e3 * med, 3), "bytes_moved_gb": round(moved / 1e9, 2),
           "achieved_tb_s": round(moved / med / 1e12, 2), "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
    del opt, params
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path or not torch.cuda.is_available():
        print("needs COMFYUI_PATH (for the UNet's shapes) and a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, comfy_path)
    shapes = sd15_shapes()
    rows = [time_step(shapes, torch.float32), time_step(shapes, torch.bfloat16)]
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "optimizer.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(json.dumps(meta))
    for r in rows:
        print(json.dumps(r))
    print(f"bf16 step / fp32 step: {rows[1]['median_ms'] / rows[0]['median_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
