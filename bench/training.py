"""GPU benchmark: Train Domain UNet's loop (training.train) on a full-size SD1.5 UNet.

    python -m bench.training --out DIR [--quick] [--cases full-b8-ckpt,lora-b8-ckpt,...] [--steps 12]
    python -m bench.training --out DIR --model sdxl --cases lora-b4-ckpt,full-b1-ckpt-8bit,...
    python -m bench.training --out DIR --families sd35m:default:1,flux_dev:float8_e4m3fn:1,zimage:default:1

Starts the real ComfyUI host in-process (tests/support/host.py; COMFYUI_PATH, else .hostsrc/ in this
repo), builds the SD1.5 UNet from its config with random fp16 weights and loads it through the
host (comfy.sd.load_diffusion_model_state_dict: the host detects SD15 and returns a ModelPatcher),
then runs the node's own adapters and loop exactly as Train Domain UNet does (nodes/training/run.py:
read_host_model, load_models_gpu, make_autograd_safe; training.train), on 512x512 images,
with the VAE replaced by random latents (the VAE runs once per image and is cached; it is not
part of a training step) and a random empty-prompt context [1, 77, 768]. --model sdxl: the same
with SDXL at 1024x1024 (context [1, 77, 2048] and the pooled-and-size input 'y' [1, 2816]).

Per case: images/s over the steps after --warmup, the peak CUDA memory allocated during
training (the base model's resident weights included: what the node needs), and MFU against
the issue's 2.47 TFLOP per SD1.5 512px training image and the GPU's dense bf16 peak.
--quick: the tiny SD1 of the tests, 64x64, on whatever device there is (checks the script).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "COMFYUI_PATH" not in os.environ and os.path.isdir(os.path.join(REPO, ".hostsrc")):
    os.environ["COMFYUI_PATH"] = os.path.join(REPO, ".hostsrc")

from tests.support import host as host_module  # noqa: E402

host_module.allocator_as_main()  # the CUDA allocator the host's main.py picks, before torch is imported
import torch  # noqa: E402

from bench.unet_configs import SD15, SD15_TINY, SDXL, SDXL_VEGA  # noqa: E402  (bench/unet_configs.py)
TFLOP_PER_IMAGE = 2.47  # SD1.5 512px, forward + backward (issue 5)
# --model: (config, quick config, pixels, context width, pooled+size width 'y' or None); MFU for SD1.5 only
UNETS = {"sd15": (SD15, SD15_TINY, 512, 768, None), "sdxl": (SDXL, SDXL_VEGA, 1024, 2048, 2816)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM
CASES = {
    # name: (mode, batch size, gradient checkpointing, TrainConfig speed options)
    "full-b8-ckpt": ("full", 8, True, {}),
    "full-b8": ("full", 8, False, {}),
    "full-b16": ("full", 16, False, {}),
    "full-b32": ("full", 32, False, {}),
    "lora-b8-ckpt": ("lora", 8, True, {}),
    "lora-b8": ("lora", 8, False, {}),
    "lora-b32": ("lora", 32, False, {}),
    # torch.compile (inductor) of the trained module (issue 5)
    "full-b8-compile": ("full", 8, False, {"compile": True}),
    "full-b8-ckpt-compile": ("full", 8, True, {"compile": True}),
    "full-b32-compile": ("full", 32, False, {"compile": True}),
    "full-b48-compile": ("full", 48, False, {"compile": True}),
    "lora-b8-compile": ("lora", 8, False, {"compile": True}),
    # SDXL at 1024 px (issue 33 item 4; --model sdxl): smaller batches, checkpointing, 8-bit states
    "lora-b1-ckpt": ("lora", 1, True, {}),
    "lora-b4-ckpt": ("lora", 4, True, {}),
    "lora-b4-ckpt-graph": ("lora", 4, True, {"cuda_graph": True}),
    "lora-b4": ("lora", 4, False, {}),
    "full-b1-ckpt": ("full", 1, True, {}),
    "full-b1-ckpt-8bit": ("full", 1, True, {"optimizer": "adamw8bit"}),
    "full-b4-ckpt-8bit": ("full", 4, True, {"optimizer": "adamw8bit"}),
    "full-b4-8bit": ("full", 4, False, {"optimizer": "adamw8bit"}),
    # bitsandbytes' 8-bit AdamW (issue 16 item 3): memory, speed, and the losses against full-b8 / full-b8-ckpt
    "full-b8-8bit": ("full", 8, False, {"optimizer": "adamw8bit"}),
    "full-b8-ckpt-8bit": ("full", 8, True, {"optimizer": "adamw8bit"}),
    # the step's forward and backward as CUDA graphs (training/graphed.py; issue 16 items 2 and 4)
    "lora-b8-graph": ("lora", 8, False, {"cuda_graph": True}),
    "full-b8-graph": ("full", 8, False, {"cuda_graph": True}),
    "lora-b8-ckpt-graph": ("lora", 8, True, {"cuda_graph": True}),
    "full-b8-ckpt-graph": ("full", 8, True, {"cuda_graph": True}),
    "full-b32-graph": ("full", 32, False, {"cuda_graph": True}),
    "full-b48-graph": ("full", 48, False, {"cuda_graph": True}),
    # issue 16 item 4: a larger batch at the same memory with 8-bit states, with the graphs
    "full-b48-8bit-graph": ("full", 48, False, {"cuda_graph": True, "optimizer": "adamw8bit"}),
    # issue 34 target 3, experiments the node does not offer (BENCH_ONLY keys): torch.compile's mode
    # "reduce-overhead" (inductor's own CUDA graphs of the compiled forward and backward), and the UNet's
    # weights in channels-last memory format (the activations follow through the convolutions)
    "full-b32-compile-ro": ("full", 32, False, {"compile": True, "compile_mode": "reduce-overhead"}),
    "full-b32-cl-compile": ("full", 32, False, {"compile": True, "channels_last": True}),
    "full-b32-cl-compile-ro": ("full", 32, False, {"compile": True, "compile_mode": "reduce-overhead", "channels_last": True}),
}
BENCH_ONLY = ("compile_mode", "channels_last")  # case keys applied here, not TrainConfig options


def random_unet(config: dict, dtype) -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    with torch.device("cpu"):
        module = UNetModel(**config, dtype=dtype, device="cpu", operations=comfy.ops.manual_cast)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in module.state_dict().items():
        sd[k] = (torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.01)).to(dtype)
    return sd


@contextlib.contextmanager
def bench_only(unet, speed: dict):
    """A case's BENCH_ONLY keys for the time of its run: torch.compile with compile_mode (the loop's
    torch.compile(forward)), the UNet's weights channels-last (the full copy is made from them and
    keeps their format)."""
    with contextlib.ExitStack() as undo:
        if speed.get("compile_mode"):
            undo.enter_context(mock.patch.object(torch, "compile", functools.partial(torch.compile, mode=speed["compile_mode"])))
        if speed.get("channels_last"):
            unet.to(memory_format=torch.channels_last)
            undo.callback(unet.to, memory_format=torch.contiguous_format)
        yield


def empty_prompt(unet_name: str):
    """cond_for of a random empty-prompt context [1, 77, width] (and SDXL's 'y': pooled output and sizes)."""
    _, _, _, width, adm = UNETS[unet_name]
    g = torch.Generator().manual_seed(2)
    cond = {"context": torch.randn(1, 77, width, generator=g)}
    if adm is not None:
        cond["y"] = torch.randn(1, adm, generator=g)
    return lambda h, w: cond


def fake_encoder(channels: int, factor: int):
    """Random latents that depend only on the image (as a VAE's would); the VAE is outside a step."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(pixels.numpy().tobytes()).digest()[:8], "little") & (2**63 - 1)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, channels, pixels.shape[1] // factor, pixels.shape[2] // factor, generator=g)
    return encode


def run_case(model, name: str, px: int, steps: int, warmup: int, images: int, profile: str | None = None,
             unet_name: str = "sd15") -> dict:
    import comfy.model_management as mm
    read = host.pack("nodes.training.inputs").read_host_model(model)  # what the node reads of the base
    training = host.pack("training")
    mode, batch, ckpt, speed = CASES[name]
    device = mm.get_torch_device()
    mm.load_models_gpu([model], force_full_load=True)  # again after a full-mode case released it, as the node does
    unet = model.model.diffusion_model
    host.pack("nodes.training.differentiable").make_autograd_safe(unet)
    profiled = 3 if profile else 0  # steps after the timed ones, under the profiler
    options = {k: v for k, v in speed.items() if k not in BENCH_ONLY}
    config = training.TrainConfig(steps=steps + profiled, mode=mode, batch_size=batch, resolution=px, lr=1e-5, flip=False,
                                  precision="bf16", gradient_checkpointing=read.checkpointed_blocks if ckpt else (),
                                  lora_rank=16, lora_alpha=16.0, **options)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(images, px, px, 3, generator=g)
    stamps = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) \
        if profile else None

    def on_step(p) -> None:
        if p.stage != "train":
            return
        stamps.append(time.perf_counter())
        if profiler is not None and len(stamps) == steps:  # after the timed steps: it slows what it watches
            profiler.start()
        elif profiler is not None and len(stamps) == steps + profiled:
            profiler.stop()

    t_begin = time.perf_counter()
    # as the node runs it (nodes/training/run.py): with checkpointing, attention without cuDNN's kernel
    in_training = host.pack("nodes.training.differentiable").host_in_training(read.family, checkpointing=ckpt)
    with tempfile.TemporaryDirectory() as cache, torch.inference_mode(False), in_training, bench_only(unet, speed):
        result = training.train(
            unet, pixels, encode=fake_encoder(4, 8), vae_id="bench", cond_for=empty_prompt(unet_name),
            alphas_cumprod=read.alphas_cumprod, prediction_type="eps", config=config, cache_dir=cache,
            on_progress=lambda p: on_step(p), device=device,
            release_base=(lambda: host.pack("nodes.dynamic_vram").release(model)) if mode == "full" else None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if profiler is not None:  # three steps: the kernels and host-side ops that take the time
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        with open(os.path.join(profile, f"profile-{name}.txt"), "w") as f:
            f.write(profiler.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    first_step_s = stamps[0] - t_begin  # latent caching + the first step (with compile: the compilation)
    timed = stamps[warmup:steps]
    secs = (timed[-1] - timed[0]) / (len(timed) - 1)
    ips = batch / secs
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), float("nan"))
    losses = [round(v, 6) for v in result.losses]
    del result
    mfu = ips * TFLOP_PER_IMAGE / peak_tflops if unet_name == "sd15" and px == 512 else float("nan")
    return {"case": name, "model": unet_name, "mode": mode, "batch": batch, "grad_ckpt": ckpt, **speed, "px": px, "step_s": secs,
            "images_per_s": ips, "peak_gib": peak, "first_step_s": first_step_s, "mfu": mfu, "losses_finite": True,
            "losses": losses}


def run_family_case(host, name: str, weight_dtype: str, batch: int, px: int, steps: int, warmup: int, images: int,
                    quick: bool) -> dict:
    """LoRA training of a diffusion transformer of bench/families.py through Train Domain UNet's own
    run (nodes/training/run.py's run_training: the family's targets, checkpointed blocks, conditioning and
    flow objective), gradient checkpointing on, bf16 autocast, loaded from a file as UNETLoader
    loads it with weight_dtype "default" (bf16) or "fp8_e4m3fn" (the host's fp8 storage, cast per
    layer). families.vae stands in for its VAE (the host's own VAE class or a TAESD of the family's
    latent channels, random weights; it encodes each image once, before the timed steps). Peak = CUDA memory allocated during the run, the
    base's resident weights included."""
    import comfy.model_management as mm
    from bench import families

    device = mm.get_torch_device()
    path = os.path.join(host.model_dir("diffusion_models"), f"bench_{name}.safetensors")
    if not os.path.exists(path):
        families.write_file(name, path, device, quick)
    model = families.load(name, path, quick, None if weight_dtype == "default" else getattr(torch, weight_dtype))
    vae = families.vae(name)
    null = families.conditioning(name, 13, quick)
    run_training = host.pack("nodes.training.run").run_training
    training = host.pack("training")
    config = training.TrainConfig(steps=steps, mode="lora", batch_size=batch, resolution=px, lr=1e-4, flip=False,
                                  precision="bf16", gradient_checkpointing=("all",), lora_rank=16, lora_alpha=16.0)
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(images, px, px, 3, generator=g)
    stamps = []
    mm.unload_all_models()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_begin = time.perf_counter()
    _, losses, *_ = run_training(model=model, vae=vae, null_conditioning=null, images=pixels, config=config,
                                   save_name=f"bench_{name}_{weight_dtype}_b{batch}", resume=False,
                                   on_progress=lambda p: stamps.append(time.perf_counter()) if p.stage == "train" else None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    timed = stamps[warmup:]
    secs = (timed[-1] - timed[0]) / (len(timed) - 1)
    weights_gib = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters()) / 2**30
    del model
    mm.unload_all_models()
    mm.soft_empty_cache()
    return {"case": f"{name}-lora-{weight_dtype}-b{batch}-ckpt", "family": name, "mode": "lora", "weight_dtype": weight_dtype,
            "batch": batch, "grad_ckpt": True, "px": px, "step_s": secs, "images_per_s": batch / secs, "peak_gib": peak,
            "weights_gib": weights_gib, "first_step_s": stamps[0] - t_begin,
            "losses_finite": bool(all(torch.isfinite(torch.tensor(losses)))), "mfu": float("nan")}


def main(argv=None) -> int:
    global host
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=list(UNETS), default="sd15",
                    help="the UNet the cases train: SD1.5 at 512 px, or SDXL at 1024 px (Segmind-Vega at 64 px with --quick)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--profile", action="store_true",
                    help="SD1.5 cases: three more steps after the timed ones, under torch.profiler (profile-<case>.txt in --out)")
    ap.add_argument("--families", default="",
                    help="instead of SD1.5: LoRA at 1024 px with checkpointing of these (bench/families.py), e.g. "
                         "sd35m:default:1,flux_dev:float8_e4m3fn:1,zimage:default:1 (name:weight dtype:batch)")
    host_module.add_card_option(ap)
    args = ap.parse_args(argv)
    if args.card_gib and not torch.cuda.is_available():
        print("--card-gib holds a CUDA GPU to a smaller card: this machine has none", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    # Families: the host as main.py starts it (dynamic VRAM where 0.33+ turns it on; training then runs on its
    # non-dynamic copy of the base, as the node does). SD1.5: as before (its state dict is built with plain ops).
    host = host_module.Host(host_module.find_host(), tempfile.mkdtemp(), cpu=args.quick and not torch.cuda.is_available(),
                            builtin_nodes=False, dynamic_vram=bool(args.families), card_gib=args.card_gib).start()
    import comfy.sd

    if args.families:
        rows = []
        for item in args.families.split(","):
            name, weight_dtype, batch = item.split(":")
            try:
                row = run_family_case(host, name, weight_dtype, int(batch), 64 if args.quick else 1024, args.steps,
                                      args.warmup, images=8 if args.quick else 16, quick=args.quick)
            except Exception as e:  # keep going: out of memory, a dtype the trainer refuses
                import traceback

                traceback.print_exc()
                row = {"case": item, "error": f"{type(e).__name__}: {e}"[:3000]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        return report(args.out, rows, "training-families.json")

    config, quick_config, px, _, _ = UNETS[args.model]
    px = 64 if args.quick else px
    model = comfy.sd.load_diffusion_model_state_dict(random_unet(quick_config if args.quick else config, torch.float16))
    print(f"host detected {type(model.model.model_config).__name__}; weights {model.model.get_dtype()}", flush=True)
    rows = []
    for name in args.cases.split(","):
        try:
            row = run_case(model, name, px, args.steps, args.warmup, images=64 if not args.quick else 8,
                           profile=args.out if args.profile else None, unet_name=args.model)
        except torch.OutOfMemoryError as e:
            row = {"case": name, "error": f"out of memory: {e}".splitlines()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return report(args.out, rows, "training.json")


def report(out: str, rows: list[dict], file: str) -> int:
    import comfyui_version

    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "comfyui": comfyui_version.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "allocator": host.allocator, "card": host.card, "rows": rows}
    with open(os.path.join(out, file), "w") as f:
        json.dump(info, f, indent=1)
    print(f"\n{'case':30} {'img/s':>8} {'step s':>8} {'peak GiB':>9} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:30} {r['error'].splitlines()[0][:200]}")
        else:
            print(f"{r['case']:30} {r['images_per_s']:8.2f} {r['step_s']:8.3f} {r['peak_gib']:9.2f} {r['mfu']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
