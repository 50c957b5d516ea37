"""GPU benchmark: KSampler (Domain Guidance) against the host's stock KSampler.

    python -m bench.sampling --out DIR [--quick] [--models sd15,sdxl] [--batches 1,4] [--repeats 3]

Starts the real ComfyUI host in-process (tests/support/host.py's Host; COMFYUI_PATH, else .host/ComfyUI
inside this repo, else the ComfyUI two folders above the pack), builds full-size SD1.5 and SDXL
UNets from their configs with random fp16 weights, loads them through the host
(comfy.sd.load_diffusion_model_state_dict: the host detects the family and returns a real
ModelPatcher), and times with torch.cuda.synchronize around each whole sampling call:

  stock          nodes.common_ksampler (what the KSampler node runs)
  full           ours, a full-copy domain UNet (a second model, its own forward per step)
  full_half      ours, full-copy domain on the interval [0, 0.5] of the run
  full_negnull   ours, full-copy domain with negative == null prompt (one base row shared)
  lora           ours, a LoRA domain (rank 32 on every attention projection, nodes.domain_files.apply_lora)
  lora_half      ours, LoRA domain on [0, 0.5]
  full_ref       ours with INDOMAIN_FAST_DOMAIN=0: the straightforward guider (domain rows through the
                 host's calc_cond_batch every step), the reference the fast path is checked against
  lora_ref       the same for the LoRA domain (a weight hook of the base, rows in the base's call)
  full_domain_only, lora_domain_only
                 ours with INDOMAIN_FAST_DOMAIN=domain: only the domain row recorded (a CUDA graph), the
                 base rows through the host's calc_cond_batch every step (the fast path before the
                 base rows were recorded too)
  full_eager, lora_eager
                 ours with INDOMAIN_FAST_DOMAIN=eager: the recorded calls made directly, no CUDA graph
                 (what "full" / "lora" do where ComfyUI was started with --disable-cuda-graphs;
                 without graphs the LoRA domain's row rides in the base's call)
  lora_separate  ours with INDOMAIN_FAST_DOMAIN=separate: as lora_eager, the LoRA domain's row in a
                 call of its own (before it rode in the base's call: nodes/sampling/lora_rows_in_base_call.py)
  full_everyK, lora_everyK
                 ours with domain_every = K (the domain rows every K-th evaluation; e.g. full_every2)
  zero           ours with domain_scale 0: each step the host's own sampling_function (since issue 15;
                 it recorded the stock rows as a CUDA graph before), i.e. stock through our node
  full_fp8       ours, the full copy's file loaded with fp8 weights (Load Domain UNet's own loader,
                 weight_dtype fp8_e4m3fn)

Each case: all models unloaded, one warm-up run (loads the models), then --repeats timed runs
(median reported), peak memory = torch.cuda.max_memory_allocated over the timed runs (and
max_memory_reserved, which holds the CUDA graphs' pools while a run lasts). At the
first batch size an extra diagnostic run per case records per-step times (a synchronize in the
step callback), the UNet forwards per step and their batch sizes (BaseModel.apply_model), and
the time the host spends swapping hook weights (ModelPatcher.patch_hooks). Also checks that
domain_scale 0 reproduces stock, and on CUDA, first, that random numbers and captures still work
after a CUDA graph capture of the fast path failed (plain torch alongside, in a child process).

Variants: a case name may carry "+variant" suffixes (e.g. stock+cl, full+cl+cudnn); the variant
applies to that case only, so its ratio against the plain case comes from the same run:

  cl             both UNets' weights in channels-last (NHWC) memory format (activations follow)
  cudnn          scaled_dot_product_attention with cuDNN attention first (the host's order on Windows)
  autotune       torch.backends.cudnn.benchmark on (the host's --fast autotune)
  compile        torch.compile (inductor, default mode, static shapes) of each UNet in place
                 (nn.Module.compile: parameter names unchanged), inside our CUDA graphs on the fast
                 path; the first run of each row shape compiles (reported as warmup_s)

A "stock+variant" case is followed by the fast-vs-straightforward check under that variant.
--channels-last: the cl variant for every case.

The host is started as its main.py starts it: with dynamic VRAM where main.py turns it on
(ComfyUI 0.33+ on NVIDIA; --dynamic-vram off for the other mode), the models loaded from files
written to its diffusion_models folder as UNETLoader loads them, and what the executor does after
each node done after each sampling run.

--models: sd15, sdxl (UNets, fp16) and the diffusion transformers of bench/families.py: sd35m (SD3.5
medium), flux_dev (Flux.1 dev), zimage (Z-Image), in bf16 at 1024x1024 px, each with the cfg its
users run (sd35m 4.5; flux_dev and zimage 1, guidance-distilled: the stock KSampler then computes
one row per step) and a rank-32 LoRA of the family's training targets.

--quick: tiny sizes on whatever device there is (CPU here): SD1 with one level, Segmind-Vega
(the host's smallest SDXL-family config) at 64x64 px, 2 steps, 1 repeat. For testing the script.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.support import host as host_module  # noqa: E402  (tests/support/host.py)

if "COMFYUI_PATH" not in os.environ and os.path.isdir(os.path.join(REPO, ".host", "ComfyUI")):
    os.environ["COMFYUI_PATH"] = os.path.join(REPO, ".host", "ComfyUI")
host_module.allocator_as_main()  # the CUDA allocator the host's main.py picks, before torch is imported
import torch  # noqa: E402
from bench import families  # noqa: E402  (bench/families.py: SD3.5 medium, Flux.1 dev, Z-Image at full size)
from tests.support.tiny_nodes import plain_weights  # noqa: E402  (host modules built here get ordinary weights)

from bench.unet_configs import SD15, SD15_TINY, SDXL, SDXL_VEGA  # noqa: E402  (bench/unet_configs.py)

MODELS = {
    # name: (config, quick config, host class names accepted, pixels, quick pixels, context dim, pooled dim)
    "sd15": (SD15, SD15_TINY, ("SD15",), 512, 64, 768, 768),
    "sdxl": (SDXL, SDXL_VEGA, ("SDXL", "Segmind_Vega"), 1024, 64, 2048, 1280),
}
LORA_TARGETS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
VARIANTS = ("cl", "cudnn", "autotune", "compile")
# INDOMAIN_FAST_DOMAIN for a case by its suffix (nodes/sampling/fastpath.py mode()); others: "1", the default
FAST_MODES = {"_ref": "0", "_domain_only": "domain", "_eager": "eager", "_separate": "separate"}
CASES = ("stock", "full", "full_half", "full_negnull", "lora", "lora_half", "full_ref", "lora_ref", "full_domain_only",
         "lora_domain_only", "full_eager", "lora_eager", "lora_separate", "zero", "full_fp8")


def is_cuda() -> bool:
    import comfy.model_management as mm

    return mm.get_torch_device().type == "cuda"


def sync():
    if is_cuda():
        torch.cuda.synchronize()


def gib(n: int) -> float:
    return round(n / 2 ** 30, 3)


# -- models ------------------------------------------------------------------------------------

def random_unet_state_dict(config: dict, seed: int, dtype, device) -> dict[str, torch.Tensor]:
    """A UNet state dict with seeded random weights (~unit activations), built on `device`."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with plain_weights():
        model = UNetModel(**config, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.normal_(0.0, 0.5 / fan_in ** 0.5 if p.ndim > 1 else 0.1, generator=g)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    return sd


def bench_file(host, name: str) -> str:
    """Where the benchmark writes the UNet file `name`: the host's diffusion_models folder."""
    return os.path.join(host.model_dir("diffusion_models"), name + ".safetensors")


def load_unet(host, sd: dict, dtype, name: str):
    """The state dict written to bench_file(name) and loaded as the host's UNETLoader loads a file
    (comfy.sd.load_diffusion_model: the model it gives can be reloaded by the host, e.g. without
    dynamic VRAM for weight hooks)."""
    import comfy.sd
    import safetensors.torch

    path = bench_file(host, name)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    patcher = comfy.sd.load_diffusion_model(path, model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError("the host did not recognise the benchmark UNet file")
    return patcher


def lora_state_dict(shapes: dict[str, torch.Size], rank: int, seed: int, dtype) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA of every attention projection, in the host's key format."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith(LORA_TARGETS) and len(shape) == 2:
            prefix = "diffusion_model." + key[: -len(".weight")]
            out[prefix + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5).to(dtype)
            out[prefix + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.1 / rank ** 0.5).to(dtype)
            out[prefix + ".alpha"] = torch.tensor(float(rank))
    return out


def conditioning(name: str, seed: int, px: int, ctx: int, pooled: int):
    """CONDITIONING as the host's text encoders give it (random values of the right shapes)."""
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, pooled, generator=g)}
    if name == "sdxl":  # CLIPTextEncodeSDXL
        extra.update(width=px, height=px, crop_w=0, crop_h=0, target_width=px, target_height=px)
    return [[torch.randn(1, 77, ctx, generator=g), extra]]


# -- instrumentation for the diagnostic run ---------------------------------------------------

class Probe:
    """Per-step times, UNet forwards and hook-weight swaps of one sampling run."""

    def __init__(self):
        self.stamps, self.forwards, self.swaps = [], [], []
        self._undo = []

    def __enter__(self):
        import comfy.model_base
        import comfy.model_patcher
        import latent_preview

        probe = self
        orig_cb = latent_preview.prepare_callback

        def prepare_callback(model, steps, x0_output_dict=None):
            cb = orig_cb(model, steps, x0_output_dict)

            def wrapped(step, x0, x, total_steps):
                sync()
                probe.stamps.append(time.perf_counter())
                return cb(step, x0, x, total_steps)
            return wrapped

        orig_apply = comfy.model_base.BaseModel.apply_model

        def apply_model(self_, x, t, *a, **kw):
            probe.forwards.append((len(probe.stamps), int(x.shape[0])))
            return orig_apply(self_, x, t, *a, **kw)

        orig_patch = comfy.model_patcher.ModelPatcher.patch_hooks

        def patch_hooks(self_, hooks):
            sync()
            t0 = time.perf_counter()
            r = orig_patch(self_, hooks)
            sync()
            probe.swaps.append((len(probe.stamps), hooks is not None, time.perf_counter() - t0))
            return r

        for owner, attr, new in ((latent_preview, "prepare_callback", prepare_callback),
                                 (comfy.model_base.BaseModel, "apply_model", apply_model),
                                 (comfy.model_patcher.ModelPatcher, "patch_hooks", patch_hooks)):
            self._undo.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, new)
        return self

    def __exit__(self, *exc):
        for owner, attr, old in reversed(self._undo):
            setattr(owner, attr, old)

    def summary(self, t0: float, active_steps: list[bool] | None) -> dict:
        ends = self.stamps
        step_s = [b - a for a, b in zip([t0] + ends[:-1], ends)]
        per_step = {}
        for step, rows in self.forwards:
            per_step.setdefault(step, []).append(rows)
        # Step 0 also holds the run's set-up (model loading check, hook registration, first LoRA merge).
        steady = list(range(1, len(step_s)))
        out = {"step_s": [round(s, 5) for s in step_s],
               "median_step_s": _median([step_s[i] for i in steady]),
               "forwards_step1": per_step.get(1, []),
               "forwards_per_run": len(self.forwards)}
        if active_steps is not None:
            on = [step_s[i] for i in steady if active_steps[i]]
            off = [step_s[i] for i in steady if not active_steps[i]]
            out.update(median_step_in_interval_s=_median(on), median_step_outside_interval_s=_median(off),
                       steps_in_interval=sum(active_steps))
        if self.swaps:
            later = [s for step, _, s in self.swaps if step >= 1]
            out.update(hook_swaps_per_run=len(self.swaps), hook_swap_total_s=round(sum(s for *_, s in self.swaps), 5),
                       hook_swap_step0_s=round(sum(s for step, _, s in self.swaps if step == 0), 5),
                       hook_swap_median_s=_median(later),
                       hook_swaps_per_step=round(len(later) / max(1, len(steady)), 2))
        return out


def _median(xs):
    return round(statistics.median(xs), 5) if xs else None


# -- the benchmark ----------------------------------------------------------------------------

class Bench:
    def __init__(self, host, quick: bool, steps: int, repeats: int, cfg: float, dtype, channels_last: bool = False):
        self.host = host
        self.channels_last = channels_last
        self.quick = quick
        self.steps = steps
        self.repeats = repeats
        self.cfg = cfg
        self.dtype = dtype
        self.sampling = host.pack("nodes.sampling.run")
        self.loader = host.pack("nodes.domain_files")

    def build(self, name: str) -> dict:
        if name in families.FAMILIES:
            return self.build_dit(name)
        import comfy.model_management as mm

        config, quick_config, accepted, px, quick_px, ctx, pooled = MODELS[name]
        config = quick_config if self.quick else config
        px = quick_px if self.quick else px
        device = mm.get_torch_device()
        t0 = time.perf_counter()
        sd = random_unet_state_dict(config, seed=0, dtype=self.dtype, device=device)
        shapes = {k: v.shape for k, v in sd.items()}
        n_params = sum(v.numel() for v in sd.values())
        base = load_unet(self.host, sd, self.dtype, f"bench_{name}_base")
        del sd
        sd = random_unet_state_dict(config, seed=1, dtype=self.dtype, device=device)
        full = load_unet(self.host, sd, self.dtype, f"bench_{name}_domain")
        del sd
        gc.collect()
        mm.soft_empty_cache()
        family = type(base.model.model_config).__name__
        if family not in accepted:
            raise RuntimeError(f"the host detected {family}, expected one of {accepted}")
        lora = self.loader.apply_lora(base, lora_state_dict(shapes, rank=32, seed=2, dtype=self.dtype), "bench_lora")
        conds = {k: conditioning(name, seed, px, ctx, pooled) for k, seed in (("positive", 11), ("negative", 12), ("null", 13))}
        return {"name": name, "family": family, "px": px, "params": n_params, "base": base, "full": full, "lora": lora,
                "domain_file": bench_file(self.host, f"bench_{name}_domain"),
                "conds": conds, "build_s": round(time.perf_counter() - t0, 2),
                "lora_keys": sum(1 for k in shapes if k.endswith(LORA_TARGETS) and len(shapes[k]) == 2)}

    def build_dit(self, name: str) -> dict:
        """A diffusion transformer of bench/families.py: one random file loaded twice through the host
        (base and a full-copy domain: weights' values do not change speed), a LoRA of the family's
        training targets, the family's conditioning shapes and the cfg its users run."""
        import comfy.model_management as mm

        spec = families.FAMILIES[name]
        t0 = time.perf_counter()
        path = os.path.join(self.host.model_dir("diffusion_models"), f"bench_{name}.safetensors")
        shapes = families.write_file(name, path, mm.get_torch_device(), self.quick)
        base, full = (families.load(name, path, self.quick, spec.get("weights", spec["dtype"])) for _ in range(2))
        gc.collect()
        mm.soft_empty_cache()
        lora_sd = families.lora_state_dict(name, shapes, rank=32, seed=2)
        lora = self.loader.apply_lora(base, lora_sd, "bench_lora")
        conds = {k: families.conditioning(name, seed, self.quick) for k, seed in (("positive", 11), ("negative", 12), ("null", 13))}
        return {"name": name, "family": type(base.model.model_config).__name__, "px": 64 if self.quick else 1024,
                "params": sum(math.prod(v) for v in shapes.values()), "base": base, "full": full, "lora": lora,
                "domain_file": path,
                "conds": conds, "build_s": round(time.perf_counter() - t0, 2), "latent_channels": spec["latent"],
                "dtype": str(spec.get("weights", spec["dtype"])), "cfg": spec["cfg"],
                "lora_keys": sum(k.endswith(".lora_down.weight") for k in lora_sd)}

    @contextlib.contextmanager
    def variant(self, m, variants: set[str]):
        """The case's variants on both UNets, undone afterwards (see the module doc)."""
        unknown = variants - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; known: {VARIANTS}")
        dms = [m["base"].model.diffusion_model, m["full"].model.diffusion_model]
        cl = "cl" in variants or self.channels_last  # conv weights NHWC; activations follow through the UNet
        with contextlib.ExitStack() as stack:
            for dm in dms:  # weights where they are (offloaded after unload_all_models); .to() keeps the format
                dm.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            if "cudnn" in variants:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                         SDPBackend.MATH]
                stack.enter_context(sdpa_kernel(order, set_priority=True))
            if "autotune" in variants:
                stack.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
                torch.backends.cudnn.benchmark = True
            if "compile" in variants:
                from torch import _dynamo

                _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 32)
                for dm in dms:
                    dm.compile(dynamic=False)
                    stack.callback(setattr, dm, "_compiled_call_impl", None)
            yield

    @staticmethod
    def weights_channels_last(m) -> float:
        """Share of the base UNet's 4-D weights in channels-last format (checks the variant took)."""
        ws = [p for p in m["base"].model.diffusion_model.parameters() if p.ndim == 4]
        ws = [p for p in ws if not (p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last))]  # 1x1: both
        return round(sum(p.is_contiguous(memory_format=torch.channels_last) for p in ws) / max(1, len(ws)), 3)

    def latent(self, m, batch: int) -> dict:
        if m["name"] in families.FAMILIES:  # (a family's own channels, downscale and, for video, frames)
            return {"samples": torch.zeros(families.latent_shape(m["name"], batch, self.quick))}
        return {"samples": torch.zeros(batch, 4, m["px"] // 8, m["px"] // 8)}

    def run_fn(self, m, case: str, batch: int, domain_scale: float = 1.5):
        """One sampling run of the case, then what the host's executor does after a node."""
        fn = self._run_fn(m, case, batch, domain_scale)

        def run():
            try:
                return fn()
            finally:
                self.host.after_node()
        return run

    def _run_fn(self, m, case: str, batch: int, domain_scale: float = 1.5):
        import nodes

        latent = self.latent(m, batch)
        c = m["conds"]
        seed = 42
        cfg = m.get("cfg", self.cfg)  # a family's own (Flux dev, Z-Image Turbo: 1) or --cfg
        if case == "stock":
            return lambda: nodes.common_ksampler(m["base"], seed, self.steps, cfg, "euler", "normal",
                                                 c["positive"], c["negative"], latent)[0]["samples"]
        if case == "zero":
            case, domain_scale = "full", 0.0
        every = 1
        if "_every" in case:  # e.g. full_every2: the speed dial domain_every = 2
            case, every = case.split("_every")[0], int(case.split("_every")[1])
        domain = self.domain(m, case)
        end = 0.5 if case.endswith("_half") else 1.0
        negative = c["null"] if case.endswith("_negnull") else c["negative"]
        fast = next((mode for suffix, mode in FAST_MODES.items() if case.endswith(suffix)), "1")
        s = self.sampling

        def fn():
            with mock.patch.dict(os.environ, {"INDOMAIN_FAST_DOMAIN": fast}):  # restored afterwards
                terms = s.collect_terms(domain, domain_scale, 0.0, end, None)
                guider = s.make_guider(m["base"], c["positive"], negative, c["null"], cfg, terms, False, every)
                return s.sample_like_ksampler(guider, seed, self.steps, "euler", "normal", latent, 1.0)["samples"]
        return fn

    def domain(self, m, case: str):
        """The case's domain: the full copy, the LoRA, or (full_fp8) the full copy's file loaded with fp8
        weights by Load Domain UNet's own loader with weight_dtype fp8_e4m3fn (once, on first use)."""
        if case.startswith("full_fp8"):
            if "full_fp8" not in m:
                m["full_fp8"] = self.loader.load_domain_unet(m["domain_file"], m["base"],
                                                             model_options=self.loader.weight_dtype_options("fp8_e4m3fn"))
            return m["full_fp8"]
        return m["full"] if case.startswith("full") else m["lora"]

    def active_steps(self, m, case: str) -> list[bool] | None:
        import comfy.samplers

        if case in ("stock", "zero"):
            return None
        end = 0.5 if case.endswith("_half") else 1.0
        ms = m["base"].get_model_object("model_sampling")
        hi, lo = float(ms.percent_to_sigma(0.0)), float(ms.percent_to_sigma(end))
        sigmas = comfy.samplers.KSampler(m["base"], steps=self.steps, device="cpu", sampler="euler",
                                         scheduler="normal", denoise=1.0).sigmas
        return [lo <= float(s) <= hi for s in sigmas[:-1]]

    def case(self, m, case: str, batch: int, diagnose: bool) -> dict:
        import comfy.model_management as mm

        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
        plain, *variants = case.split("+")
        with self.variant(m, set(variants)):
            row = self.timed(m, plain, batch, diagnose)
        return {**row, "case": case}

    def timed(self, m, case: str, batch: int, diagnose: bool) -> dict:
        cuda = is_cuda()
        fn = self.run_fn(m, case, batch)
        sync()
        base_alloc = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        with PathLog() as paths:
            out = fn()  # warm-up: loads the models
        sync()
        warm_s = time.perf_counter() - t0
        resident = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.empty_cache()  # the reserved peak then counts this case's blocks and graph pools only
            torch.cuda.reset_peak_memory_stats()
        times = []
        with PathLog() as timed_paths:
            for _ in range(self.repeats):
                sync()
                t0 = time.perf_counter()
                out = fn()
                sync()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        peak_reserved = torch.cuda.max_memory_reserved() if cuda else 0  # CUDA-graph pools held during the run
        row = {"model": m["name"], "batch": batch, "case": case, "times_s": [round(t, 5) for t in times],
               "median_s": round(statistics.median(times), 5), "warmup_s": round(warm_s, 3),
               "peak_gib": gib(peak), "peak_reserved_gib": gib(peak_reserved), "resident_gib": gib(resident),
               "before_gib": gib(base_alloc),
               "finite": bool(torch.isfinite(out).all()), "out_std": round(float(out.float().std()), 4),
               "paths": paths.messages, "captures_timed": [m for m in timed_paths.messages if "captured" in m],
               "weights_channels_last": self.weights_channels_last(m)}
        if diagnose:
            with Probe() as probe:
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                total = time.perf_counter() - t0
            row["diag"] = {"run_s": round(total, 5), **probe.summary(t0, self.active_steps(m, case))}
        self.last_out = out.float().cpu()
        return row

    def scale_zero_check(self, m, stock_out) -> list[dict]:
        """domain_scale 0 with each kind of domain against the stock KSampler's latent."""
        out = []
        for case in ("full", "lora"):
            sample = self.run_fn(m, case, 1, domain_scale=0.0)().float().cpu()
            diff = (sample - stock_out).abs().max().item()
            out.append({"model": m["name"], "domain": case, "max_abs_diff": diff,
                        "max_abs_stock": stock_out.abs().max().item(), "finite": bool(torch.isfinite(sample).all())})
        return out

    def reference_check(self, m, batch: int) -> list[dict]:
        """The fast path (CUDA graphs on a GPU) against the straightforward guider, same seed."""
        out = []
        for case in ("full", "lora"):
            fast = self.run_fn(m, case, batch)().float().cpu()
            ref = self.run_fn(m, case + "_ref", batch)().float().cpu()
            diff = (fast - ref).abs().max().item()
            out.append({"model": m["name"], "batch": batch, "domain": case, "fast_vs_ref_max_abs_diff": diff,
                        "max_abs_ref": ref.abs().max().item(), "rel": diff / max(ref.abs().max().item(), 1e-12)})
        return out


_RAW_FAILED_CAPTURE = """
import torch
x = torch.ones(4, device="cuda")
g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
with torch.cuda.stream(s):
    g.capture_begin(capture_error_mode="thread_local")
    try:
        float(x.sum())  # a device sync: not allowed while capturing
    except Exception:
        pass
    try:
        g.capture_end()
    except Exception:
        pass
torch.randn(4, device="cuda")
"""


def capture_failure_check(cudagraph) -> dict:
    """A failed CUDA graph capture, then random numbers on the device: plain torch (in a child
    process: the state it leaves is process-wide) against cudagraph.Graph (restores it)."""
    import subprocess

    raw = subprocess.run([sys.executable, "-c", _RAW_FAILED_CAPTURE], capture_output=True, text=True)
    x, t = torch.ones(4, device="cuda"), torch.zeros(1, device="cuda")
    dev = x.device
    out = {"check": "failed capture, then torch.randn on the device",
           "plain_torch": "ok" if raw.returncode == 0 else raw.stderr.strip().splitlines()[-1][:200]}
    try:
        cudagraph.Graph(lambda a, b: a * float(a.sum()), [x, t], dev)
        out["fastpath_capture"] = "captured (unexpected)"
    except Exception as e:
        out["fastpath_capture"] = f"failed as expected: {type(e).__name__}"
    try:
        torch.randn(4, device="cuda")
        graph = cudagraph.Graph(lambda a, b: a * 2 + b, [x, t], dev)
        out["fastpath_after"] = "ok" if torch.equal(graph(x + 1, t + 1), (x + 1) * 2 + 1) else "wrong replay"
        graph.release()
    except Exception as e:
        out["fastpath_after"] = f"{type(e).__name__}: {e}"[:200]
    return out


class PathLog(logging.Handler):
    """Collects the guider's 'fast path' / 'straightforward path' / joint call log lines of one run."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if "fast path" in msg or "straightforward path" in msg or "CUDA graph" in msg or "in the base's call" in msg:
            self.messages.append(msg)

    def __enter__(self):
        root = logging.getLogger()
        self._level = root.level
        root.addHandler(self)
        root.setLevel(min(root.level, logging.INFO))
        self._fast = [l for l in logging.Logger.manager.loggerDict.values()
                      if isinstance(l, logging.Logger) and l.name.endswith(".nodes.sampling.fastpath")]
        for l in self._fast:  # its capture timings are DEBUG lines
            l.setLevel(logging.DEBUG)
        self.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._level)
        for l in self._fast:
            l.setLevel(logging.NOTSET)


def profile(fn, path: str) -> None:
    """One run of `fn` under cProfile (top functions by total time) and torch.profiler (kernels)."""
    import cProfile
    import io
    import pstats

    fn()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
    with open(path + "-cprofile.txt", "w") as f:
        f.write(text.getvalue())
    if is_cuda():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            fn()
            sync()
        with open(path + "-torch.txt", "w") as f:
            f.write(p.key_averages().table(sort_by="cuda_time_total", row_limit=40))
            f.write("\n")
            f.write(p.key_averages().table(sort_by="cpu_time_total", row_limit=30))


def table(rows: list[dict]) -> str:
    stock = {(r["model"], r["batch"]): r["median_s"] for r in rows if r["case"] == "stock" and "median_s" in r}
    lines = [f"{'model':6} {'batch':>5} {'case':17} {'median s':>9} {'x stock':>8} {'peak GiB':>9} {'step in/out ms':>15}"]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"{r['model']:6} {r['batch']:>5} {r['case']:17} ERROR {r.get('error', '')[:60]}")
            continue
        ref = stock.get((r["model"], r["batch"]))
        ratio = f"{r['median_s'] / ref:.2f}" if ref else "-"
        d = r.get("diag", {})
        steps = ""
        if d.get("median_step_in_interval_s") is not None:
            off = d.get("median_step_outside_interval_s")
            steps = f"{1e3 * d['median_step_in_interval_s']:.1f}/" + (f"{1e3 * off:.1f}" if off is not None else "-")
        elif d.get("median_step_s") is not None:
            steps = f"{1e3 * d['median_step_s']:.1f}"
        lines.append(f"{r['model']:6} {r['batch']:>5} {r['case']:17} {r['median_s']:>9.3f} {ratio:>8} {r['peak_gib']:>9.2f} {steps:>15}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for sampling.json")
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 steps, 1 repeat (tests the script)")
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--cpu", action="store_true", help="run the host on the CPU even where there is a GPU")
    ap.add_argument("--dynamic-vram", choices=("auto", "off"), default="auto",
                    help="auto: the host's dynamic VRAM on where its main.py turns it on (ComfyUI 0.33+ on "
                         "NVIDIA); off: as with --disable-dynamic-vram")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights in channels-last memory format (all cases)")
    host_module.add_card_option(ap)
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="compare the fast path with the straightforward guider per model and batch (default on)")
    ap.add_argument("--profile", action="store_true",
                    help="after each timed case, one more run under cProfile and torch.profiler (written to --out)")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    os.makedirs(args.out, exist_ok=True)

    path = host_module.find_host()
    if path is None:
        print("no ComfyUI host: set COMFYUI_PATH", file=sys.stderr)
        return 2
    use_cpu = args.cpu or not torch.cuda.is_available()
    if args.card_gib and use_cpu:
        print("--card-gib holds a CUDA GPU to a smaller card: this run is on the CPU", file=sys.stderr)
        return 2
    base_dir = tempfile.mkdtemp(prefix="indomain-bench-")
    atexit.register(shutil.rmtree, base_dir, ignore_errors=True)  # model files of several GB
    if args.dynamic_vram == "off":
        sys.path.insert(0, path)
        from comfy.cli_args import args as host_args

        host_args.disable_dynamic_vram = True
    host = host_module.Host(path, base_dir, cpu=use_cpu, builtin_nodes=False, dynamic_vram=True,
                            card_gib=args.card_gib).start()
    import comfy.model_management as mm
    import comfy.utils
    import comfyui_version

    comfy.utils.PROGRESS_BAR_ENABLED = False  # both samplers: no tqdm on the timed path
    device = mm.get_torch_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": mm.get_torch_device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "comfyui": comfyui_version.__version__, "dtype": str(dtype), "steps": steps, "repeats": repeats,
            "cfg": args.cfg, "sampler": "euler", "scheduler": "normal", "quick": args.quick,
            "attention": "pytorch" if mm.pytorch_attention_enabled() else "other",
            "vram_state": str(mm.vram_state), "lora_rank": 32, "domain_scale": 1.5,
            "channels_last": args.channels_last, "dynamic_vram": host.dynamic_vram, "allocator": host.allocator, "card": host.card,
            "models_from": "files (comfy.sd.load_diffusion_model, as UNETLoader)"}
    print(json.dumps(meta), flush=True)
    bench = Bench(host, args.quick, steps, repeats, args.cfg, dtype, args.channels_last)
    result = {"meta": meta, "models": [], "results": [], "checks": []}
    json_path = os.path.join(args.out, "sampling.json")

    def save():
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)

    if is_cuda():
        result["checks"].append(capture_failure_check(host.pack("cudagraph")))
        print(json.dumps(result["checks"][-1]), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    for name in args.models.split(","):
        m = bench.build(name)
        result["models"].append({k: m[k] for k in ("name", "family", "px", "params", "build_s", "lora_keys", "cfg", "dtype")
                                 if k in m})
        print(f"built {name}: host detected {m['family']}, {m['params'] / 1e6:.0f}M parameters, "
              f"{m['lora_keys']} LoRA targets, {m['build_s']} s", flush=True)
        save()
        for batch in batches:
            for case in cases:
                try:
                    row = bench.case(m, case, batch, diagnose=(batch == batches[0]))
                    if args.profile:
                        profile(bench.run_fn(m, case, batch), os.path.join(args.out, f"profile-{name}-b{batch}-{case}"))
                except Exception as e:  # keep going: a partial table is worth more than none
                    import traceback

                    traceback.print_exc()
                    row = {"model": name, "batch": batch, "case": case, "error": f"{type(e).__name__}: {e}"}
                result["results"].append(row)
                print(json.dumps(row), flush=True)
                save()
                plain, *variants = case.split("+")
                if plain == "stock" and "median_s" in row and args.check:
                    try:
                        with bench.variant(m, set(variants)):
                            checks = [{**c, "variants": variants} for c in bench.reference_check(m, batch)]
                    except Exception as e:
                        checks = [{"model": name, "batch": batch, "error": f"{type(e).__name__}: {e}"}]
                    result["checks"].extend(checks)
                    print(json.dumps(checks), flush=True)
                    save()
                if case == "stock" and batch == 1 and "median_s" in row:
                    try:
                        checks = bench.scale_zero_check(m, bench.last_out)
                    except Exception as e:
                        checks = [{"model": name, "error": f"{type(e).__name__}: {e}"}]
                    result["checks"].extend(checks)
                    print(json.dumps(checks), flush=True)
                    save()
        del m
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()

    print()
    print(f"device: {meta['device']}  torch {meta['torch']}  ComfyUI {meta['comfyui']}  {steps} euler steps, "
          f"median of {repeats}")
    print(table(result["results"]))
    for c in result["checks"]:
        label = ("fast path vs straightforward:" if "fast_vs_ref_max_abs_diff" in c else
                 "capture failure:" if "check" in c else "domain_scale 0 vs stock:")
        print(label, json.dumps(c))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
