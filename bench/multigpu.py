"""Multi-GPU training benchmark: SD1.5 (the full-size UNet config, random weights) full and LoRA
training at 512 px on 1 GPU and on N GPUs under torchrun: images/s, the scaling, and the peak
memory of every GPU.

    python -m bench.multigpu --out DIR [--gpus 2] [--per-gpu-batch 8] [--cases full,lora,full-zero] [--steps 12]

Run plainly, it is the driver: it runs itself as a worker (--worker) once in one process (1 GPU)
and once under `python -m torch.distributed.run --standalone --nproc-per-node N` (N GPUs), then
writes DIR/multigpu.json with both rows per case and `scaling` = images/s on N GPUs / images/s on
one (the target: >= 1.8 on 2 GPUs). The global batch is per-gpu-batch x GPUs (weak scaling: each
GPU always trains on per-gpu-batch images per step, so the step's work per GPU is the same).

A worker starts the real ComfyUI host in-process as bench/training.py does (tests/support/host.py;
COMFYUI_PATH), on its rank's GPU (torch.cuda.set_device(LOCAL_RANK) first, so the host picks it),
builds the SD1.5 UNet from its config with random fp16 weights through the host's loader, and runs
the node's own adapters and training.train with the process group (NCCL). Cases:
    full        mode full, gradient checkpointing off, bf16
    lora        mode lora (rank 16), gradient checkpointing off, bf16
    full-zero   mode full with shard_optimizer (ZeroRedundancyOptimizer); N GPUs only (one GPU: "full")
Per case: images/s over the steps after --warmup (rank 0's clock: every step ends with a
collective, so it is every rank's), the step time, the peak CUDA memory allocated on each GPU
(the base model's weights included) and MFU per GPU against 2.47 TFLOP per 512 px image.
--quick: the tiny SD1 of the tests at 64 px, on whatever there is (CPU: gloo), to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.support import host as host_module  # noqa: E402  (tests/support/host.py)

host_module.allocator_as_main()  # the CUDA allocator the host's main.py picks, before torch is imported
import torch  # noqa: E402
CASES = {  # name: (mode, gradient checkpointing, TrainConfig speed options)
    "full": ("full", False, {}),
    "lora": ("lora", False, {}),
    "full-zero": ("full", False, {"shard_optimizer": True}),
}


def bench_training():
    """bench/training.py (its SD1.5 config, random weights, fake VAE, host start), loaded under its own name."""
    from bench import training
    return training


def worker(args) -> int:
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local)  # before the host starts: it trains on the current device
    if world > 1:
        torch.distributed.init_process_group("nccl" if gpu else "gloo",
                                             **({"device_id": torch.device("cuda", local)} if gpu else {}))
    rank = torch.distributed.get_rank() if world > 1 else 0
    bt = bench_training()
    bt.host = bt.host_module.Host(bt.host_module.find_host(), tempfile.mkdtemp(), cpu=not gpu, builtin_nodes=False).start()
    import comfy.model_management as mm
    import comfy.sd

    training = bt.host.pack("training")
    px = 64 if args.quick else 512
    model = comfy.sd.load_diffusion_model_state_dict(bt.random_unet(bt.SD15_TINY if args.quick else bt.SD15, torch.float16))
    read = bt.host.pack("nodes.training.inputs").read_host_model(model)  # what the node reads of the base
    rows = []
    for name in args.cases.split(","):
        if name == "full-zero" and world == 1:
            continue
        mode, ckpt, speed = CASES[name]
        batch = args.per_gpu_batch * world
        device = mm.get_torch_device()
        mm.load_models_gpu([model], force_full_load=True)
        unet = model.model.diffusion_model
        bt.host.pack("nodes.training.differentiable").make_autograd_safe(unet)
        config = training.TrainConfig(steps=args.steps, mode=mode, batch_size=batch, resolution=px, lr=1e-5, flip=False,
                                      precision="bf16", lora_rank=16, lora_alpha=16.0,
                                      gradient_checkpointing=read.checkpointed_blocks if ckpt else (), **speed)
        pixels = torch.rand(max(64, 4 * batch), px, px, 3, generator=torch.Generator().manual_seed(1))
        stamps, error = [], None
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t_begin = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as cache, torch.inference_mode(False):
                result = training.train(
                    unet, pixels, encode=bt.fake_encoder(4, 8), vae_id="bench",
                    cond_for=lambda h, w: {"context": torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))},
                    alphas_cumprod=read.alphas_cumprod, prediction_type="eps", config=config, cache_dir=cache,
                    on_progress=lambda p: stamps.append(time.perf_counter()) if p.stage == "train" else None, device=device)
            finite = all(v == v for v in result.losses)
            del result
        except torch.OutOfMemoryError as e:  # every rank's own; with NCCL the others stop with it (torchrun)
            error = f"out of memory: {e}".splitlines()[0]
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
        peaks = [peak]
        if world > 1:
            peaks = [None] * world
            torch.distributed.all_gather_object(peaks, peak)
        if rank != 0:
            continue
        if error is not None:
            rows.append({"case": name, "gpus": world, "error": error})
            continue
        timed = stamps[args.warmup:]
        step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
        ips = batch / step_s
        gpu_name = torch.cuda.get_device_name() if gpu else "cpu"
        peak_tflops = next((v for k, v in bt.PEAK_BF16_TFLOPS.items() if k in gpu_name), float("nan"))
        rows.append({"case": name, "mode": mode, "gpus": world, "global_batch": batch, "per_gpu_batch": args.per_gpu_batch,
                     "grad_ckpt": ckpt, **speed, "px": px, "step_s": step_s, "images_per_s": ips,
                     "images_per_s_per_gpu": ips / world, "peak_gib_per_gpu": peaks, "first_step_s": stamps[0] - t_begin,
                     "mfu_per_gpu": ips / world * bt.TFLOP_PER_IMAGE / peak_tflops, "losses_finite": finite})
        print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        info = {"device": torch.cuda.get_device_name() if gpu else "cpu", "gpus": world, "torch": torch.__version__,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
                "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
        with open(os.path.join(args.out, f"multigpu-{world}gpu.json"), "w") as f:
            json.dump(info, f, indent=1)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def driver(args, argv) -> int:
    own = [a for a in argv]
    one = [sys.executable, "-m", "bench.multigpu", "--worker", *own]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.gpus),
            "-m", "bench.multigpu", "--worker", *own]
    for cmd in (one, many):
        print("$", " ".join(cmd), flush=True)
        code = subprocess.call(cmd, cwd=REPO)
        if code != 0:
            print(f"exit code {code}", flush=True)
    results = {}
    for n in (1, args.gpus):
        path = os.path.join(args.out, f"multigpu-{n}gpu.json")
        if os.path.exists(path):
            results[n] = json.load(open(path))
    by_case = {}
    for n, info in results.items():
        for row in info["rows"]:
            by_case.setdefault(row["case"], {})[n] = row
    summary = []
    for case, rows in by_case.items():
        base = rows.get(1) or (by_case.get("full", {}).get(1) if case == "full-zero" else None)
        top = rows.get(args.gpus)
        ok = base and top and "error" not in base and "error" not in top
        summary.append({"case": case, "one_gpu": base, f"{args.gpus}_gpus": top,
                        "scaling": top["images_per_s"] / base["images_per_s"] if ok else None,
                        "target": 1.8 if args.gpus == 2 else 0.9 * args.gpus})
    out = {"gpus": args.gpus, "per_gpu_batch": args.per_gpu_batch, "summary": summary,
           "runs": {str(n): info for n, info in results.items()}}
    with open(os.path.join(args.out, "multigpu.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{'case':10} {'1 GPU img/s':>12} {f'{args.gpus} GPUs img/s':>13} {'scaling':>8} {'peak GiB per GPU (1 | N)':>28}")
    for s in summary:
        one_row, top_row = s["one_gpu"] or {}, s[f"{args.gpus}_gpus"] or {}
        fmt = lambda r: f"{r['images_per_s']:.1f}" if "images_per_s" in r else r.get("error", "-")[:12]  # noqa: E731
        peaks = f"{one_row.get('peak_gib_per_gpu', ['-'])} | {top_row.get('peak_gib_per_gpu', '-')}"
        scaling = f"{s['scaling']:.2f}x" if s["scaling"] else "-"
        print(f"{s['case']:10} {fmt(one_row):>12} {fmt(top_row):>13} {scaling:>8}   {peaks}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--per-gpu-batch", type=int, default=8)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        return worker(args)
    return driver(args, [a for a in argv if a != "--worker"])


if __name__ == "__main__":
    sys.exit(main())
