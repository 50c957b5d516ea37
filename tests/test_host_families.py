"""Sampling with domain guidance for today's model families, in the real host (issue 17 and issue 32, item 1).

Each family is a tiny random-weight model of the host's own class (tests/support/tiny_families.py): SD2.x
v-prediction, SDXL, SD3 (MMDiT, flow), Flux.1 dev (guidance-distilled), Flux.1 schnell and Z-Image; and the
families users run now (tests/support/tiny_newer_families.py): Flux.2 dev, Qwen-Image, Chroma, HunyuanImage
2.1, Wan 2.2 TI2V 5B and the Wan 2.2 A14B experts' class, whose additions (reference images, guidance,
video latents, the two experts) tests/test_host_families_newer.py checks.
Conditioning is built directly with the family's widths (pooled output, Flux's guidance), no text
encoder; the latent comes from the host's own empty-latent node of the family (5-D for Qwen-Image and
Wan). For every family, through KSampler (Domain Guidance) and Domain Guider:

(a) domain_scale 0 is the stock KSampler (and Domain Guider the stock CFGGuider) bit for bit;
(b) the base MODEL wired in as the domain is the stock KSampler bit for bit;
(c) cfg 0, negative = the empty prompt, domain_scale 1 is the domain model alone (stock KSampler at
    cfg 1 on the domain model with the empty prompt);
(d) a full-copy domain (another random model of the family): the fast path gives the straightforward
    path's latents bit for bit, and both equal n + cfg (c - n) + w (d - u) computed row by row;
(e) a LoRA domain (the host's key format, on the attention Linears): fast path within 1e-4 of the
    straightforward path (the weight hook), and it moves the sample.
The fast path's log line is checked for each family: "fast path (direct...)" on the CPU.

Flux.1 dev reads its guidance embedding from each row's conditioning: the domain rows u and d are
computed with the prompt's guidance (the guider gives the empty prompt the positive's value), so the
null conditioning's own guidance does not drive the domain term (also at cfg 1, as Flux is run).

In the GPU tier (--gpu, not yet run there) the comparisons that are bit for bit on the CPU are made
within 1e-5, the formula within 1e-3 and the LoRA within 2e-4 (half-precision weights).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.support import tiny_families as fam
from tests.support import tiny_nodes as tiny
from tests.support.family_graphs import (STEPS, cond, custom_sampling, domain_guider, formula_guider, graph,
                                         path_lines, rel_tolerance, run)
from tests.support.graphs import close
from tests.support.tiny_newer_families import LATENT_SHAPES

FAMILIES = list(fam.SPECS)  # the six of issue 17, then the families users run now (issue 32)


@pytest.fixture(scope="module", autouse=True)
def family_nodes(comfy):
    fam.register()


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="module")
def lora_files(comfy):
    d = comfy.model_dir("domain_unets")
    return {f: os.path.basename(tiny.write_safetensors(os.path.join(d, f"family_{f}_lora.safetensors"),
                                                       fam.lora_state_dict(f)))
            for f in FAMILIES}


class _Stock(dict):
    def __init__(self, comfy):
        super().__init__()
        self.comfy = comfy

    def __missing__(self, family):
        self[family] = self.comfy.run(graph(family, sampler="KSampler"))["captured"]["out"]["samples"]
        return self[family]


@pytest.fixture(scope="module")
def stock(comfy):
    """The stock KSampler's latent per family (the default graph), made when a test first asks for it."""
    return _Stock(comfy)


# family -> (the host's model config class, its BaseModel class, prediction type, shift of its model_sampling)
HOST_CLASSES = {
    "sd2_v": ("SD20", "BaseModel", "V_PREDICTION", None),
    "sdxl": ("SDXL", "SDXL", "EPS", None),
    "sd3": ("SD3", "SD3", "FLOW", 3.0),
    "flux_dev": ("Flux", "Flux", "FLUX", 1.15),
    "flux_schnell": ("FluxSchnell", "Flux", "FLOW", 1.0),
    "zimage": ("ZImage", "Lumina2", "FLOW", 3.0),
    "flux2": ("Flux2", "Flux2", "FLUX", 2.02),
    "qwen_image": ("QwenImage", "QwenImage", "FLUX", 1.15),
    "chroma": ("Chroma", "Chroma", "FLUX", 1.15),
    "hunyuan_image": ("HunyuanImage21", "HunyuanImage21", "FLOW", 5.0),
    "wan22_5b": ("WAN22_T2V", "WAN22", "FLOW", 8.0),
    "wan22_a14b": ("WAN21_T2V", "WAN21", "FLOW", 8.0),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_models_are_the_hosts_own_classes(comfy, family):
    model = fam.family_model(family).model
    config_cls, model_cls, model_type, shift = HOST_CLASSES[family]
    assert (type(model.model_config).__name__, type(model).__name__, model.model_type.name) == (config_cls, model_cls, model_type)
    assert getattr(model.model_sampling, "shift", None) == shift
    assert model.latent_format.latent_channels == LATENT_SHAPES[family][0]
    assert fam.family_model(family, 1) is not fam.family_model(family) and fam.family_model(family, 0) is fam.family_model(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_zero_and_domain_equal_to_base_are_stock_bit_for_bit(comfy, monkeypatch, stock, family):
    ref = stock[family]
    assert (ref.shape[1], ref.ndim) == LATENT_SHAPES[family] and torch.isfinite(ref).all() and ref.abs().max() > 0
    # (a) weight 0 with a full-copy domain wired in: KSampler (Domain Guidance) and Domain Guider.
    extra = {**custom_sampling(domain_guider(weight=0.0), "guided"),
             **custom_sampling({"class_type": "CFGGuider", "inputs": {"model": ["base", 0], "positive": ["pos", 0],
                                                                      "negative": ["neg", 0], "cfg": 4.0}}, "cfg")}
    out = run(comfy, monkeypatch, graph(family, domain=("dom", 0), domain_scale=0.0, extra=extra))
    assert torch.equal(out["out"], ref)
    assert torch.equal(out["guided"], out["cfg"])
    assert torch.equal(out["cfg"], ref)  # (the same noise, sigmas and sampler as the KSampler node)
    # (b) the base MODEL wired in as the domain, at a weight that would count.
    same = run(comfy, monkeypatch, graph(family, domain=("base", 0), domain_scale=1.5))["out"]
    assert torch.equal(same, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_zero_empty_negative_domain_one_is_the_domain_model_alone(comfy, monkeypatch, family):
    ours = run(comfy, monkeypatch, graph(family, negative="", cfg=0.0, domain=("dom", 0), domain_scale=1.0))["out"]
    alone = run(comfy, monkeypatch, graph(family, sampler="KSampler", model=("dom", 0), positive="", negative="", cfg=1.0))["out"]
    base = run(comfy, monkeypatch, graph(family, sampler="KSampler", positive="", negative="", cfg=1.0))["out"]
    assert close(ours, alone)
    assert not close(alone, base, rel=1e-2)  # the two models differ: the check has teeth


@pytest.mark.parametrize("family", FAMILIES)
def test_full_copy_domain_fast_equals_straightforward_equals_the_formula(comfy, monkeypatch, caplog, on_gpu, stock,
                                                                         family):
    w = 0.8
    extra = {**custom_sampling(domain_guider(weight=w), "guided"), **custom_sampling(formula_guider(w), "formula")}
    slow = run(comfy, monkeypatch, graph(family, domain=("dom", 0), domain_scale=w, extra=extra), fast=False)
    assert path_lines(caplog, on_gpu) == []
    caplog.clear()
    fast = run(comfy, monkeypatch, graph(family, domain=("dom", 0), domain_scale=w), fast=True)["out"]
    lines = path_lines(caplog, on_gpu, family)
    assert lines == ["domain 'domain_model': fast path (recorded)", "base model (3 rows): fast path (recorded)"], lines
    assert torch.equal(fast, slow["out"]) if not on_gpu else close(fast, slow["out"])
    # rows batched by the host vs one call per row (half-precision GEMMs of other batch sizes on a GPU: not measured)
    assert close(slow["out"], slow["formula"], rel=rel_tolerance(family, on_gpu, 1e-5))
    assert close(slow["guided"], slow["out"])  # the guider node gives what the sampler node gives
    assert not close(slow["out"], stock[family], rel=1e-3)  # the domain term counts


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_domain_fast_path_equals_the_weight_hook(comfy, monkeypatch, caplog, on_gpu, lora_files, stock, family):
    loader = {"class_type": "InDomainUNetLoader", "inputs": {"unet_name": lora_files[family], "lora_strength": 1.0,
                                                             "base_model": ["base", 0]}}
    prompt = graph(family, domain=("lora", 0), domain_scale=1.5, extra={"lora": loader})
    hooked = run(comfy, monkeypatch, prompt, fast=False)["out"]
    caplog.clear()
    adapters = run(comfy, monkeypatch, prompt, fast=True)["out"]
    lines = path_lines(caplog, on_gpu, family)
    assert lines == ["domain 'domain_model': fast path (recorded, LoRA as adapters)",
                     "base model (3 rows): fast path (recorded)"], lines
    assert torch.isfinite(adapters).all()
    assert close(adapters, hooked, rel=rel_tolerance(family, on_gpu, 1e-4))  # x W + (x down) up against the merged weights
    assert not close(adapters, stock[family], rel=1e-3)  # the LoRA moves the sample


# -- Flux.1 dev: the guidance embedding ---------------------------------------------------------------

def _record_guidance(monkeypatch, patcher, calls: list):
    """Record the guidance values every call of this model's Flux transformer receives."""
    module = patcher.model.diffusion_model
    forward = module.forward

    def recording(*args, **kwargs):
        g = kwargs.get("guidance")
        calls.append(None if g is None else sorted({round(float(v), 4) for v in g.flatten()}))
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", recording)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_flux_dev_every_row_gets_the_prompts_guidance(comfy, monkeypatch, on_gpu, fast):
    """FluxGuidance 2.0 on the prompt and the negative, the empty prompt left at another value (5.0):
    the base's rows (c, n, u) and the domain's row d are all computed at 2.0."""
    base, domain = fam.family_model("flux_dev", 0), fam.family_model("flux_dev", 1)
    base_calls, domain_calls = [], []
    _record_guidance(monkeypatch, base, base_calls)
    _record_guidance(monkeypatch, domain, domain_calls)
    run(comfy, monkeypatch, graph("flux_dev", guidance={"pos": 2.0, "neg": 2.0, "null": 5.0}, domain=("dom", 0),
                                  domain_scale=1.0), fast=fast)
    # (a CUDA graph replays the call recorded on the first step without entering Python)
    expected = STEPS if not (fast and on_gpu) else 1
    assert len(base_calls) >= expected and len(domain_calls) >= expected and len(base_calls) <= STEPS
    assert all(values == [2.0] for values in base_calls + domain_calls), (base_calls, domain_calls)


def test_flux_dev_the_empty_prompts_guidance_does_not_drive_the_domain_term(comfy, monkeypatch):
    def sample(null_guidance, pos_guidance=2.0):
        return run(comfy, monkeypatch, graph("flux_dev", guidance={"pos": pos_guidance, "null": null_guidance},
                                             domain=("dom", 0), domain_scale=1.5))["out"]

    ref = sample(None)
    assert torch.equal(sample(5.0), ref)  # the empty prompt's own guidance (here 5.0, or none) is not used
    assert torch.equal(sample(2.0), ref)
    assert not close(sample(None, pos_guidance=6.0), ref, rel=1e-3)  # the prompt's guidance is


def test_flux_dev_weight_zero_and_cfg_zero_with_guidance_on_every_prompt(comfy, monkeypatch):
    """FluxGuidance 2.0 on each of the three prompts: the invariants hold at that guidance as well."""
    g = {"pos": 2.0, "neg": 2.0, "null": 2.0}
    stock = run(comfy, monkeypatch, graph("flux_dev", sampler="KSampler", guidance=g))["out"]
    assert torch.equal(run(comfy, monkeypatch, graph("flux_dev", guidance=g, domain=("dom", 0), domain_scale=0.0))["out"], stock)
    ours = run(comfy, monkeypatch, graph("flux_dev", guidance=g, negative="", cfg=0.0, domain=("dom", 0)))["out"]
    alone = run(comfy, monkeypatch, graph("flux_dev", sampler="KSampler", guidance=g, model=("dom", 0), positive="",
                                          negative="", cfg=1.0))["out"]
    assert close(ours, alone)


def test_flux_dev_as_users_run_it_cfg_one_guidance_on_the_prompt_only(comfy, monkeypatch, caplog, on_gpu):
    """cfg 1, FluxGuidance 2.5 on the prompt only: c + w (d - u), u and d at 2.5 (the formula with the empty
    prompt given 2.5 itself), on the fast path."""
    w = 1.2
    extra = {"null_g": cond("flux_dev", "", 2.5), **custom_sampling(formula_guider(w, cfg=1.0, null=("null_g", 0)), "formula")}
    prompt = graph("flux_dev", guidance={"pos": 2.5}, cfg=1.0, domain=("dom", 0), domain_scale=w, extra=extra)
    slow = run(comfy, monkeypatch, prompt, fast=False)
    caplog.clear()
    fast = run(comfy, monkeypatch, prompt, fast=True)["out"]
    assert path_lines(caplog, on_gpu) == ["domain 'domain_model': fast path (recorded)",
                                          "base model (3 rows): fast path (recorded)"]  # (the skipped negative counted)
    assert torch.equal(fast, slow["out"]) if not on_gpu else close(fast, slow["out"])
    assert close(slow["out"], slow["formula"], rel=rel_tolerance("flux_dev", on_gpu, 1e-5))
