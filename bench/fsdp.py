"""Full-mode training sharded with FSDP2 (issue 35): images/s and memory per GPU of SDXL, Flux.1 dev
and Z-Image full copies (random weights, full-size configs) on 1 GPU and on N under torchrun.

    python -m bench.fsdp --out DIR [--model sdxl|flux_dev|zimage] [--cases ddp-zero,fsdp] [--gpus 1,2]
        [--per-gpu-batch 2] [--px 1024] [--steps 8] [--warmup 3] [--quick]

The runs of issue 35 (docs/GPU_TIER.md):
    python -m bench.fsdp --out bench/_out --model sdxl --cases ddp-zero,fsdp --gpus 2
    python -m bench.fsdp --out bench/_out --model flux_dev --cases fsdp-offload --gpus 1
    python -m bench.fsdp --out bench/_out --model zimage --cases fsdp --gpus 1,2,4,8    (the scaling)

Run plainly, it is the driver: for each GPU count it runs itself as a worker (--worker) under
`python -m torch.distributed.run --standalone --nproc-per-node N` (1 included: fsdp needs a
process group), then writes DIR/fsdp-<model>.json and prints a table with scaling = images/s on N
GPUs / (N x images/s on the fewest GPUs measured). Cases (all mode full, bf16, the family's
checkpointed blocks, AdamW):
    ddp          DistributedDataParallel, a whole copy and AdamW state per GPU
    ddp-zero     DDP with shard_optimizer (ZeroRedundancyOptimizer: 1/N of AdamW's state per GPU)
    fsdp         FSDP2: weights, gradients and AdamW states sharded (training/sharded.py)
    fsdp-offload FSDP2 with cpu_offload: the shards and states in CPU memory
A worker starts the host in-process on its rank's GPU (tests/support/host.py, as bench/multigpu.py),
builds the family's diffusion model from its config with random bf16 weights (bench/families.py;
SDXL: bench/unet_configs.py), reads it as the node does (read_host_model: conditioning, objective,
checkpointed blocks) and runs training.train without a state file (nothing large is written).
Per case: images/s over the steps after --warmup, the peak CUDA memory allocated per GPU, the
peak resident CPU memory per process, or the error (out of memory). --quick: the tiny configs at
64 px on whatever there is (CPU: gloo), to check the script.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from tests.support import host as host_module  # noqa: E402  (tests/support/host.py)

host_module.allocator_as_main()  # the CUDA allocator the host's main.py picks, before torch is imported
import torch  # noqa: E402

CASES = {"ddp": {}, "ddp-zero": {"shard_optimizer": True}, "fsdp": {"fsdp": True},
         "fsdp-offload": {"fsdp": True, "cpu_offload": True}}


def load_model(bt, name: str, quick: bool):
    """The MODEL (random bf16 weights through the host's loader) and its empty prompt's CONDITIONING."""
    import comfy.sd

    if name == "sdxl":
        from bench import unet_configs

        config = unet_configs.SD15_TINY if quick else unet_configs.SDXL
        model = comfy.sd.load_diffusion_model_state_dict(bt.random_unet(config, torch.bfloat16))
        g = torch.Generator().manual_seed(13)
        context = 768 if quick else 2048
        return model, [[torch.randn(1, 77, context, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]], 4
    from bench import families

    path = os.path.join(tempfile.gettempdir(), f"bench_fsdp_{name}{'_quick' if quick else ''}.safetensors")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not os.path.exists(path):
        families.write_file(name, path, torch.device("cpu"), quick)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return families.load(name, path, quick, torch.bfloat16), families.conditioning(name, 13, quick), families.FAMILIES[name]["latent"]


def worker(args) -> int:
    local, gpu = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local)  # before the host starts: it trains on the current device
    torch.distributed.init_process_group("nccl" if gpu else "gloo", **({"device_id": torch.device("cuda", local)} if gpu else {}))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from bench import training as bt

    bt.host = bt.host_module.Host(bt.host_module.find_host(), tempfile.mkdtemp(), cpu=not gpu, builtin_nodes=False).start()
    import comfy.model_management as mm

    training, inputs = bt.host.pack("training"), bt.host.pack("nodes.training.inputs")
    model, null, channels = load_model(bt, args.model, args.quick)
    read = inputs.read_host_model(model)
    cross_attn, extras = inputs.empty_prompt(null, None)
    px, rows = 64 if args.quick else args.px, []
    for name in args.cases.split(","):
        if name == "ddp-zero" and world == 1:
            continue
        rows.append(run_case(training, bt, mm, model, read, inputs.cond_function(read, cross_attn, extras), channels, name,
                             px, world, args))
    peaks = [None] * world
    torch.distributed.all_gather_object(peaks, [(r.get("peak_gib"), r.get("cpu_peak_gib")) for r in rows])
    if rank == 0:
        for k, row in enumerate(rows):
            row["peak_gib_per_gpu"], row["cpu_peak_gib_per_process"] = [p[k][0] for p in peaks], [p[k][1] for p in peaks]
        info = {"device": torch.cuda.get_device_name() if gpu else "cpu", "gpus": world, "torch": torch.__version__,
                "model": args.model, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        with open(os.path.join(args.out, f"fsdp-{args.model}-{world}gpu.json"), "w") as f:
            json.dump(info, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0


def run_case(training, bt, mm, model, read, cond_for, channels: int, name: str, px: int, world: int, args) -> dict:
    """One case's training steps, timed: images/s, peak GPU memory, peak resident CPU memory."""
    batch = args.per_gpu_batch * world
    mm.load_models_gpu([model], force_full_load=True)
    unet = model.model.diffusion_model
    bt.host.pack("nodes.training.differentiable").make_autograd_safe(unet)
    config = training.TrainConfig(steps=args.steps, mode="full", batch_size=batch, resolution=px, lr=1e-5, flip=False,
                                  precision="bf16", gradient_checkpointing=read.checkpointed_blocks, **CASES[name])
    pixels = torch.rand(max(8, 2 * batch), px, px, 3, generator=torch.Generator().manual_seed(1))
    stamps, gpu = [], torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"case": name, "gpus": world, "global_batch": batch, "px": px}
    try:
        with tempfile.TemporaryDirectory() as cache, torch.inference_mode(False):
            result = training.train(unet, pixels, encode=bt.fake_encoder(channels, 8), vae_id="bench", cond_for=cond_for,
                                    alphas_cumprod=read.alphas_cumprod, prediction_type=read.prediction_type, flow=read.flow,
                                    config=config, cache_dir=cache, device=mm.get_torch_device(),
                                    on_progress=lambda p: stamps.append(time.perf_counter()) if p.stage == "train" else None)
        timed = stamps[args.warmup:]  # (rank 0's: the loop reports progress there; every step ends with a collective)
        if len(timed) > 1:
            step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
            row.update(step_s=step_s, images_per_s=batch / step_s, images_per_s_per_gpu=batch / step_s / world,
                       losses_finite=all(v == v for v in result.losses))
        del result
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory: {e}".splitlines()[0]
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    row["cpu_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def driver(args, argv) -> int:
    results = {}
    for n in map(int, args.gpus.split(",")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "bench.fsdp", "--worker", *argv]
        print("$", " ".join(cmd), flush=True)
        if subprocess.call(cmd, cwd=REPO) != 0:
            print(f"{n} GPUs: exit code != 0", flush=True)
        path = os.path.join(args.out, f"fsdp-{args.model}-{n}gpu.json")
        if os.path.exists(path):
            results[n] = json.load(open(path))
    rows = [row for info in results.values() for row in info["rows"]]
    fewest = {}
    for row in rows:
        if "images_per_s" in row and row["case"] not in fewest:
            fewest[row["case"]] = row
    print(f"\n{args.model}: {'case':13} {'GPUs':>4} {'img/s':>8} {'scaling':>8} {'peak GiB per GPU':>18} {'CPU GiB':>8}")
    for row in rows:
        base = fewest.get(row["case"])
        if "images_per_s" in row and base is not None:
            row["scaling"] = row["images_per_s"] / (base["images_per_s"] * row["gpus"] / base["gpus"])
        ips = f"{row['images_per_s']:.2f}" if "images_per_s" in row else row.get("error", "-")[:8]
        peak = max(p or 0 for p in row.get("peak_gib_per_gpu", [0]))
        print(f"{'':{len(args.model) + 2}}{row['case']:13} {row['gpus']:>4} {ips:>8} {row.get('scaling', 0):>8.2f} "
              f"{peak:>18.1f} {max(row.get('cpu_peak_gib_per_process', [0])):>8.1f}")
    with open(os.path.join(args.out, f"fsdp-{args.model}.json"), "w") as f:
        json.dump({"model": args.model, "runs": {str(n): info for n, info in results.items()}}, f, indent=1)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="sdxl", choices=["sdxl", "flux_dev", "zimage"])
    ap.add_argument("--cases", default="ddp-zero,fsdp")
    ap.add_argument("--gpus", default="1,2", help="the GPU counts, comma-separated")
    ap.add_argument("--per-gpu-batch", type=int, default=2)
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
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
