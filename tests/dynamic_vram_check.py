"""The fast path under the host's dynamic VRAM, in a fresh process (dynamic VRAM is turned on
before the host is imported, as its main.py does). Run by tests/test_gpu_dynamic_vram.py:

    python tests/dynamic_vram_check.py OUT_JSON

SD1.5-size UNets with random fp16 weights (layers big enough to get slots), written to the host's
diffusion_models folder and loaded as UNETLoader loads them; a full-copy and a LoRA domain. For
each: the fast path's output and its paths (log lines), the straightforward guider's output
(INDOMAIN_FAST_DOMAIN=0), and a fast run whose weights are evicted from VRAM at step 5 (the
host's own vbar.free_memory, what its memory pressure does). Exit 77: no dynamic VRAM here.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from unittest import mock

import torch

from tests.support import host as host_module  # noqa: E402

STEPS = 12


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(out_path: str) -> int:
    path = host_module.find_host()
    h = host_module.Host(path, tempfile.mkdtemp(prefix="indomain-dyn-"), cpu=not torch.cuda.is_available(), builtin_nodes=False,
                         dynamic_vram=True).start()
    if not h.dynamic_vram:
        print("no dynamic VRAM in this host / on this device", file=sys.stderr)
        return 77
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers

    from bench import sampling as bench  # bench/sampling.py: the benchmark's models

    lines = Lines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)
    S = h.pack("nodes.sampling.run")
    loader = h.pack("nodes.domain_files")
    device = mm.get_torch_device()
    dtype = torch.float16
    sd = bench.random_unet_state_dict(bench.SD15, seed=0, dtype=dtype, device=device)
    shapes = {k: v.shape for k, v in sd.items()}
    base = bench.load_unet(h, sd, dtype, "dyn_base")
    full = bench.load_unet(h, bench.random_unet_state_dict(bench.SD15, seed=1, dtype=dtype, device=device), dtype,
                           "dyn_domain")
    del sd
    lora = loader.apply_lora(base, bench.lora_state_dict(shapes, rank=16, seed=2, dtype=dtype), "dyn_lora")
    conds = {k: bench.conditioning("sd15", seed, 512, 768, 768) for k, seed in (("pos", 11), ("neg", 12), ("null", 13))}
    latent = torch.zeros(1, 4, 64, 64)

    def evict():
        freed = 0
        for p in (base, full):
            vbar = p.model.dynamic_vbars.get(p.load_device)
            if vbar is not None:
                freed += int(vbar.free_memory(1 << 40))
        return freed

    def run(domain, fast: str, evict_at: int | None = None):
        freed = []

        def callback(step, x0, x, total):
            if step == evict_at:
                torch.cuda.synchronize()
                freed.append(evict())

        start = len(lines.lines)
        with mock.patch.dict(os.environ, {"INDOMAIN_FAST_DOMAIN": fast}):
            guider = S.make_guider(base, conds["pos"], conds["neg"], conds["null"], 7.0,
                                   S.collect_terms(domain, 1.5, 0.0, 1.0, None), False)
            noise = comfy.sample.prepare_noise(latent, 42)
            sigmas = comfy.samplers.KSampler(base, steps=STEPS, device=device, sampler="euler", scheduler="normal",
                                             denoise=1.0).sigmas
            out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, callback=callback,
                                seed=42).float().cpu()
        h.after_node()
        return out, lines.lines[start:], freed

    result = {"dynamic_vram": True, "patcher": type(base).__name__, "cases": []}
    for kind, domain in (("full", full), ("lora", lora)):
        fast, fast_lines, _ = run(domain, "1")
        ref, _, _ = run(domain, "0")
        evicted, evicted_lines, freed = run(domain, "1", evict_at=5)
        scale = float(ref.abs().max())
        result["cases"].append({
            "domain": kind,
            "fast_lines": [s for s in fast_lines if "path" in s or "graph" in s.lower() or "evicted" in s],
            "evicted_lines": [s for s in evicted_lines if "path" in s or "graph" in s.lower() or "evicted" in s],
            "freed_bytes": freed,
            "fast_vs_ref_rel": float((fast - ref).abs().max()) / scale,
            "evicted_vs_fast_rel": float((evicted - fast).abs().max()) / scale,
            "finite": bool(torch.isfinite(fast).all() and torch.isfinite(evicted).all()),
        })
        print(json.dumps(result["cases"][-1]), flush=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
