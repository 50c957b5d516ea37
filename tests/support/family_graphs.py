"""The prompts of the per-family sampling tests (tests/test_host_families*.py): a tiny family model ->
conditioning -> (Domain) KSampler or SamplerCustomAdvanced with a guider -> captured latents (and Wan 2.2
A14B's two-expert chain), and how a run's fast-path log lines and tolerances are read."""
from __future__ import annotations

import torch

from tests.support import tiny_families as fam
from tests.support.tiny_newer_families import latent_nodes

STEPS = 2  # the fast path records on the first step and calls the record directly from the second
RECORDED = {False: "(direct", True: "(graph"}  # how the device makes a recorded call, by the `graphs` fixture


def cond(family, text, guidance=None):
    return {"class_type": "TestFamilyConditioning",
            "inputs": {"family": family, "text": text, "guidance": -1.0 if guidance is None else guidance}}


def graph(family, *, sampler="InDomainKSampler", model=("base", 0), positive="a photo of a cat", negative="blurry",
          null="", guidance=None, cfg=4.0, domain=None, domain_scale=1.0, batch=1, steps=STEPS, extra=None):
    """Tiny family model -> conditioning -> (Domain) KSampler -> capture. guidance: {"pos"|"neg"|"null": value}.
    The latent is the host's own empty-latent node of the family (tiny_newer_families.LATENTS)."""
    guidance = guidance or {}
    p = {
        "base": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 0}},
        "dom": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 1}},
        "pos": cond(family, positive, guidance.get("pos")),
        "neg": cond(family, negative, guidance.get("neg")),
        "null": cond(family, null, guidance.get("null")),
        **latent_nodes(family, batch),  # the host's, as users' graphs have
        "cap": {"class_type": "TestCapture", "inputs": {"value": ["sample", 0], "label": "out"}},
    }
    inputs = {"model": list(model), "seed": 7, "steps": steps, "cfg": cfg, "sampler_name": "euler",
              "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
              "denoise": 1.0}
    if sampler == "InDomainKSampler":
        inputs.update({"null_conditioning": ["null", 0], "domain_scale": domain_scale, "domain_start": 0.0,
                       "domain_end": 1.0, "control_in_domain": False})
        if domain is not None:
            inputs["domain_model"] = list(domain)
    p["sample"] = {"class_type": sampler, "inputs": inputs}
    p.update(extra or {})
    return p


def custom_sampling(guider_node: dict, label: str) -> dict:
    """SamplerCustomAdvanced with `guider_node`, the KSampler node's noise, sampler and sigmas."""
    return {
        f"{label}_guider": guider_node,
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["base", 0], "scheduler": "simple",
                                                              "steps": STEPS, "denoise": 1.0}},
        f"{label}_adv": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": [f"{label}_guider", 0], "sampler": ["ksel", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        f"{label}_cap": {"class_type": "TestCapture", "inputs": {"value": [f"{label}_adv", 0], "label": label}},
    }


def domain_guider(domain=("dom", 0), weight=1.0, cfg=4.0, model=("base", 0), positive=("pos", 0),
                  negative=("neg", 0), null=("null", 0)) -> dict:
    return {"class_type": "InDomainGuider", "inputs": {
        "model": list(model), "positive": list(positive), "negative": list(negative), "null_conditioning": list(null),
        "cfg": cfg, "domain_model": list(domain), "domain_scale": weight, "domain_start": 0.0, "domain_end": 1.0,
        "control_in_domain": False}}


def formula_guider(weight, cfg=4.0, model=("base", 0), domain=("dom", 0), positive=("pos", 0), negative=("neg", 0),
                   null=("null", 0)) -> dict:
    """TestFormulaGuider: n + cfg (c - n) + w (d - u), every row its own host call (the oracle)."""
    return {"class_type": "TestFormulaGuider", "inputs": {
        "model": list(model), "domain_model": list(domain), "positive": list(positive), "negative": list(negative),
        "null_conditioning": list(null), "cfg": cfg, "weight": weight}}


EXPERT_STEPS, SWITCH = 4, 2  # the template's 20 steps switching at 10, scaled down


def wan_experts(guider: str, weight: float = 1.0) -> dict:
    """The host's Wan 2.2 A14B text-to-video template, tiny: the high-noise and the low-noise expert (WAN21_T2V,
    ModelSamplingSD3 shift 8 each), cfg 3.5, euler/simple. guider "stock": its two KSamplerAdvanced (steps 0-2
    on the high-noise expert with leftover noise, then 2-end on the low-noise one without adding noise). Else
    the same with the pack's nodes: SplitSigmas at step 2 of the high-noise model's schedule, two
    SamplerCustomAdvanced (RandomNoise, then DisableNoise), each with a guider of its expert: "cfg" (CFGGuider),
    "domain" (Domain Guider with its own domain: seed 1 for the high-noise expert, 3 for the low-noise one) or
    "formula" (TestFormulaGuider, the oracle)."""
    family = "wan22_a14b"
    p = {
        "high_raw": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 0}},
        "low_raw": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 2}},
        "high": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["high_raw", 0], "shift": 8.0}},
        "low": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["low_raw", 0], "shift": 8.0}},
        "dom_high": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 1}},
        "dom_low": {"class_type": "TestFamilyModel", "inputs": {"family": family, "seed": 3}},
        "pos": cond(family, "a cat walking"), "neg": cond(family, "static, blurry"), "null": cond(family, ""),
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                       "batch_size": 1}},
        "cap": {"class_type": "TestCapture", "inputs": {"value": ["second", 0], "label": "out"}},
    }
    if guider == "stock":
        common = {"steps": EXPERT_STEPS, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple",
                  "positive": ["pos", 0], "negative": ["neg", 0]}
        p["first"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **common, "model": ["high", 0], "add_noise": "enable", "noise_seed": 7, "latent_image": ["latent", 0],
            "start_at_step": 0, "end_at_step": SWITCH, "return_with_leftover_noise": "enable"}}
        p["second"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **common, "model": ["low", 0], "add_noise": "disable", "noise_seed": 0, "latent_image": ["first", 0],
            "start_at_step": SWITCH, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
        return p

    def make(expert, domain):
        if guider == "cfg":
            return {"class_type": "CFGGuider", "inputs": {"model": [expert, 0], "positive": ["pos", 0],
                                                          "negative": ["neg", 0], "cfg": 3.5}}
        if guider == "formula":
            return formula_guider(weight, cfg=3.5, model=(expert, 0), domain=(domain, 0))
        return domain_guider(domain=(domain, 0), weight=weight, cfg=3.5, model=(expert, 0))

    p.update({
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["high", 0], "scheduler": "simple",
                                                              "steps": EXPERT_STEPS, "denoise": 1.0}},
        "split": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sigmas", 0], "step": SWITCH}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "no_noise": {"class_type": "DisableNoise", "inputs": {}},
        "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "g_high": make("high", "dom_high"), "g_low": make("low", "dom_low"),
        "first": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["g_high", 0], "sampler": ["ksel", 0], "sigmas": ["split", 0],
            "latent_image": ["latent", 0]}},
        "second": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["no_noise", 0], "guider": ["g_low", 0], "sampler": ["ksel", 0], "sigmas": ["split", 1],
            "latent_image": ["first", 0]}},
    })
    return p


def run(comfy, monkeypatch, prompt, fast=True) -> dict:
    """Every captured LATENT's samples, the fast path on (default) or off (INDOMAIN_FAST_DOMAIN=0)."""
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "1" if fast else "0")
    return {k: v["samples"] for k, v in comfy.run(prompt)["captured"].items()}


def rel_tolerance(family: str, on_gpu: bool, cpu: float) -> float:
    """`cpu` on the CPU (float32); on a GPU, the precision the host runs the family's weights in
    (bf16 for Flux and Z-Image, fp16 for the others on an H200) sets it: the same maths in another
    order of rounding (rows batched or one by one, LoRA merged or as x down up) differs by about
    that much after a few layers (measured on the H200: fp16 up to 1.2e-3, bf16 up to 9.3e-3)."""
    if not on_gpu:
        return cpu
    dtype = fam.family_model(family).model.get_dtype()
    return {torch.float16: 3e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-3)


# Families whose forward copies from pageable CPU memory on every call (Wan's timestep embedding builds its
# frequencies on the CPU and moves them): no CUDA graph can capture that, so on a GPU their recorded calls
# are made directly (the fast path tries one capture per loaded model: nodes/sampling/fastpath.py).
NO_CAPTURE = {"wan22_5b", "wan22_a14b"}


def path_lines(caplog, on_gpu, family: str | None = None) -> list[str]:
    """The run's fast-path log lines, the device's way of making a recorded call named "(recorded" (for a
    NO_CAPTURE family on a GPU: the direct call)."""
    lines = [r.getMessage() for r in caplog.records
             if "fast path" in r.getMessage() or "straightforward path" in r.getMessage()]
    recorded = "(direct" if on_gpu and family in NO_CAPTURE else RECORDED[on_gpu]
    return [line.replace(recorded, "(recorded") for line in lines]
