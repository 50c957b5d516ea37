"""What the families users run now add to domain-guided sampling, in the real host (issue 32, item 1).

The checks every family gets (domain weight 0 and domain = base are KSampler bit for bit; cfg 0 + empty
negative + domain 1 is the domain alone; a full-copy domain's fast path is the straightforward path and
the formula; a LoRA domain in the host's key format) run for these families in tests/test_host_families.py.
Here, with tiny random-weight models of the host's own classes (tests/support/tiny_newer_families.py):

- Flux.2 dev: its guidance embedding (every row at the prompt's FluxGuidance) and reference images
  (ReferenceLatent, as the host's Flux.2 template puts them on the prompt);
- Qwen-Image Edit: reference latents from the host's TextEncodeQwenImageEdit on the prompt, the negative
  and (as the user wires it) the empty prompt; 5-D latents;
- Chroma: no guidance embedding in the checkpoint (every row at the host's default 0);
- HunyuanImage 2.1: a prompt that quotes text (ByT5 glyph features on the prompt's row only);
- Wan 2.2: 5-D video latents with the TI2V 5B's start frame (per-frame timesteps from its noise mask), and
  the A14B's two experts (high noise, then low noise) with one domain each, switched at the host's step.

Reference images, one rule for every family, the host's: a conditioning carries the references the user
put on it (ReferenceLatent and TextEncodeQwenImageEdit append them to the conditioning they are given; the
host never copies them from one conditioning to another, and its KSampler gives the negative the
references of the negative alone). So the domain rows u and d take the empty prompt's conditioning as
wired: its own references once each (none if it has none), never the prompt's added to them.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from tests.support import tiny_families as fam
from tests.support.family_graphs import (EXPERT_STEPS, STEPS, SWITCH, cond, custom_sampling, formula_guider, graph,
                                         path_lines, rel_tolerance, run, wan_experts)
from tests.support.graphs import close


@pytest.fixture(scope="module", autouse=True)
def family_nodes(comfy):
    fam.register()


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)


def rows_refs_guidance(x, args, kwargs) -> dict:
    """A transformer call's rows (batch size), reference latents per row (their count), guidance values."""
    refs, g = kwargs.get("ref_latents"), kwargs.get("guidance")
    assert refs is None or all(r.shape[0] == x.shape[0] for r in refs)  # one reference set per row
    return {"rows": x.shape[0], "refs": 0 if refs is None else len(refs),
            "guidance": None if g is None else sorted({round(float(v), 4) for v in g.flatten()})}


# What a call under a CUDA graph capture records: reading its values (a copy to the CPU) would end the capture.
CAPTURE = "the capture's call"


def record_calls(monkeypatch, patcher, calls: list, read=rows_refs_guidance):
    """Record read(x, the other arguments, the keyword arguments) for every call of this model's transformer
    (CAPTURE for the call the fast path records as a CUDA graph)."""
    module = patcher.model.diffusion_model
    forward = module.forward

    def recording(x, *args, **kwargs):
        calls.append(CAPTURE if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
                     else read(x, args, kwargs))
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(module, "forward", recording)


def per_step(call, on_gpu: bool, fast: bool = True) -> list:
    """The calls a run of STEPS steps records: one a step; on the GPU's fast path the first step's and the
    capture's at the second (the CUDA graph replays the later steps without entering Python)."""
    return [call, CAPTURE][:STEPS] if on_gpu and fast else [call] * STEPS


def read_calls(calls: list) -> list:
    """The calls whose values were read (not the capture's)."""
    return [c for c in calls if c != CAPTURE]


def image_nodes(family: str) -> dict:
    """A 64 x 64 image (the host's EmptyImage) and the family's stand-in VAE."""
    return {"image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                             "color": 0x8040C0}},
            "vae": {"class_type": "TestFamilyVAE", "inputs": {"family": family}}}


# -- Flux.2 dev: guidance and reference images ----------------------------------------------------------

def flux2_edit(null_reference: bool, null_guidance: float | None, weight: float = 1.2, extra=None) -> dict:
    """The host's Flux.2 template with domain guidance: the image VAE-encoded, ReferenceLatent on the prompt,
    FluxGuidance 4 on it; cfg 1 (as its BasicGuider), through KSampler (Domain Guidance). The empty prompt with the
    same reference (null_reference) or plain; FluxGuidance null_guidance on it (None: none)."""
    nodes = {
        **image_nodes("flux2"),
        "ref": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}},
        "pos_text": cond("flux2", "a photo of a cat"),
        "pos_ref": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["pos_text", 0], "latent": ["ref", 0]}},
        "pos": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos_ref", 0], "guidance": 4.0}},
        "null": cond("flux2", "", null_guidance),
    }
    if null_reference:
        nodes["null_text"] = nodes.pop("null")
        nodes["null"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["null_text", 0],
                                                                     "latent": ["ref", 0]}}
    return graph("flux2", cfg=1.0, domain=("dom", 0), domain_scale=weight, extra={**nodes, **(extra or {})})


@pytest.mark.parametrize("null_reference", [False, True], ids=["plain_empty_prompt", "empty_prompt_with_reference"])
def test_flux2_reference_image_and_guidance_each_row_as_wired(comfy, monkeypatch, caplog, on_gpu, null_reference):
    """Flux.2 as its template runs it (reference image on the prompt, FluxGuidance 4, cfg 1) with a full-copy
    domain: c gets the reference once; u and d get the empty prompt's own references once each (none for a
    plain empty prompt); every row is at the prompt's guidance 4, whatever the empty prompt carries (here
    FluxGuidance 5, or none, which Flux.2 would read as 3.5). The samples are the formula's, on the fast path
    as on the straightforward one."""
    base, domain = fam.family_model("flux2", 0), fam.family_model("flux2", 1)
    base_calls, domain_calls = [], []
    record_calls(monkeypatch, base, base_calls)
    record_calls(monkeypatch, domain, domain_calls)
    null_guidance = 5.0 if null_reference else None
    oracle_null = {"null_g": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["null", 0], "guidance": 4.0}}}
    prompt = flux2_edit(null_reference, null_guidance,
                        extra={**oracle_null, **custom_sampling(formula_guider(1.2, cfg=1.0, null=("null_g", 0)), "formula")})
    slow = run(comfy, monkeypatch, prompt, fast=False)
    caplog.clear()
    base_calls.clear(), domain_calls.clear()
    fast = run(comfy, monkeypatch, flux2_edit(null_reference, null_guidance), fast=True)["out"]

    refs = 1 if null_reference else 0
    assert domain_calls == per_step({"rows": 1, "refs": refs, "guidance": [4.0]}, on_gpu)
    if null_reference:  # c and u alike: the host batches them in one call, recorded
        assert base_calls == per_step({"rows": 2, "refs": 1, "guidance": [4.0]}, on_gpu)
        assert path_lines(caplog, on_gpu) == ["domain 'domain_model': fast path (recorded)",
                                              "base model (3 rows): fast path (recorded)"]
    else:  # c with its reference, u without: two calls, as the host makes them (its call every step)
        assert base_calls == [{"rows": 1, "refs": 1, "guidance": [4.0]}, {"rows": 1, "refs": 0, "guidance": [4.0]}] * STEPS
        assert path_lines(caplog, on_gpu) == [
            "domain 'domain_model': fast path (recorded)",
            "base model (3 rows): straightforward path (the host's call was not one model call on all rows (2 calls))"]
    assert torch.equal(fast, slow["out"]) if not on_gpu else close(fast, slow["out"])
    assert close(slow["out"], slow["formula"], rel=rel_tolerance("flux2", on_gpu, 1e-5))


def test_flux2_the_reference_and_the_guidance_count(comfy, monkeypatch):
    """The checks above have teeth: another reference image, or another guidance on the prompt, moves the sample."""
    ref = run(comfy, monkeypatch, flux2_edit(True, None))["out"]
    other_image = flux2_edit(True, None, extra={"image": {"class_type": "EmptyImage", "inputs": {
        "width": 64, "height": 64, "batch_size": 1, "color": 0x20C040}}})
    assert not close(run(comfy, monkeypatch, other_image)["out"], ref, rel=1e-4)
    other_guidance = flux2_edit(True, None)
    other_guidance["pos"]["inputs"]["guidance"] = 2.0
    assert not close(run(comfy, monkeypatch, other_guidance)["out"], ref, rel=1e-4)


def stock_ksampler(prompt: dict) -> dict:
    """The prompt with the host's KSampler, given the inputs it has, in place of KSampler (Domain Guidance)."""
    keep = ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise")
    inputs = {k: v for k, v in prompt["sample"]["inputs"].items() if k in keep}
    return {**prompt, "sample": {**prompt["sample"], "class_type": "KSampler", "inputs": inputs}}


def test_flux2_from_the_generic_empty_latent_is_the_stock_ksamplers_latent(comfy, monkeypatch):
    """ComfyUI 0.33's Empty Latent Image says it made a latent for an 8x VAE (downscale_ratio_spacial);
    KSampler turns it into Flux.2's empty latent: 128 channels at 16x, a quarter of the positions
    (comfy.sample.fix_empty_latent_channels). At domain weight 0 KSampler (Domain Guidance) samples that
    same latent, bit for bit, and passes the ratio on no more than KSampler does."""
    prompt = graph("flux2", cfg=1.0, domain=("dom", 0), domain_scale=0.0,
                   extra={"latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}})
    ours, stock = comfy.run(prompt)["captured"]["out"], comfy.run(stock_ksampler(prompt))["captured"]["out"]
    assert ours["samples"].shape == stock["samples"].shape and ours["samples"].shape[1] == 128
    assert torch.equal(ours["samples"], stock["samples"])
    assert ours.keys() == stock.keys()


# -- Qwen-Image Edit: reference latents from TextEncodeQwenImageEdit -------------------------------------

@pytest.fixture(scope="module")
def edit_images(comfy):
    """The image to edit, saved twice under two names in the host's input folder (a user's second Load Image
    of the same picture gives equal pixels in another tensor)."""
    import folder_paths
    from PIL import Image

    pixels = (torch.arange(64 * 64 * 3).reshape(64, 64, 3) * 7 % 256).to(torch.uint8).numpy()
    for name in ("edit_me.png", "edit_me_copy.png"):
        Image.fromarray(pixels).save(os.path.join(folder_paths.get_input_directory(), name))
    return "edit_me.png", "edit_me_copy.png"


def qwen_edit(null: str, weight: float = 1.5, cfg: float = 2.5, image="edit_me.png", extra=None) -> tuple[dict, tuple]:
    """The host's Qwen-Image Edit template with domain guidance: prompt and negative ("") both encoded by
    TextEncodeQwenImageEdit with the loaded image and the VAE. The empty prompt (null): "negative" (the
    negative's own output), "image_loaded_twice" (TextEncodeQwenImageEdit of "" with a second Load Image of a
    copy of the picture) or "plain" (no image). Returns the prompt and the null's link."""
    def encode(text, image_node="image"):
        return {"class_type": "TextEncodeQwenImageEdit", "inputs": {"clip": ["clip", 0], "prompt": text,
                                                                    "vae": ["vae", 0], "image": [image_node, 0]}}

    nodes = {"image": {"class_type": "LoadImage", "inputs": {"image": image}},
             "vae": {"class_type": "TestFamilyVAE", "inputs": {"family": "qwen_image"}},
             "clip": {"class_type": "TestFamilyCLIP", "inputs": {"family": "qwen_image"}},
             "pos": encode("a photo of a cat"), "neg": encode("")}
    null_link = {"negative": ("neg", 0), "image_loaded_twice": ("null_edit", 0), "plain": ("null", 0)}[null]
    if null == "image_loaded_twice":
        nodes["image_copy"] = {"class_type": "LoadImage", "inputs": {"image": "edit_me_copy.png"}}
        nodes["null_edit"] = encode("", "image_copy")
    prompt = graph("qwen_image", cfg=cfg, domain=("dom", 0), domain_scale=weight, extra={**nodes, **(extra or {})})
    prompt["sample"]["inputs"]["null_conditioning"] = list(null_link)
    return prompt, null_link


@pytest.mark.parametrize("null", ["negative", "image_loaded_twice", "plain"])
def test_qwen_image_edit_reference_reaches_each_row_once_as_wired(comfy, monkeypatch, caplog, on_gpu, edit_images, null):
    """Qwen-Image Edit as its template runs it: prompt and negative each carry the image's reference latent
    (TextEncodeQwenImageEdit). The empty prompt encoded the same way (the negative's own output, or the same
    picture loaded a second time and encoded with "") gives u and d that reference once each (u shares the
    negative's row: the same values are one row, references compared by value); a plain empty
    prompt gives them none. c and n keep theirs, once. The samples are the formula's (fast and straightforward)."""
    base, domain = fam.family_model("qwen_image", 0), fam.family_model("qwen_image", 1)
    base_calls, domain_calls = [], []
    record_calls(monkeypatch, base, base_calls)
    record_calls(monkeypatch, domain, domain_calls)
    prompt, null_link = qwen_edit(null)
    slow = run(comfy, monkeypatch, {**prompt, **custom_sampling(formula_guider(1.5, cfg=2.5, null=null_link), "formula")},
               fast=False)
    caplog.clear()
    base_calls.clear(), domain_calls.clear()
    comfy.pack("cudagraph").OWNER.release(why="the test wants this run's capture")  # (an earlier case's equal rows')
    fast = run(comfy, monkeypatch, qwen_edit(null)[0], fast=True)["out"]

    refs = 0 if null == "plain" else 1
    assert domain_calls == per_step({"rows": 1, "refs": refs, "guidance": None}, on_gpu)
    if refs:  # the negative's row is u: one call of c and n, both with the reference, recorded
        assert base_calls == per_step({"rows": 2, "refs": 1, "guidance": None}, on_gpu)
        assert path_lines(caplog, on_gpu) == ["domain 'domain_model': fast path (recorded)",
                                              "base model (2 rows): fast path (recorded)"]
    else:  # c and n with the reference in one call, u without in another, as the host makes them
        assert base_calls == [{"rows": 2, "refs": 1, "guidance": None}, {"rows": 1, "refs": 0, "guidance": None}] * STEPS
        assert path_lines(caplog, on_gpu) == [
            "domain 'domain_model': fast path (recorded)",
            "base model (3 rows): straightforward path (the host's call was not one model call on all rows (2 calls))"]
    assert fast.ndim == 5 and fast.shape[1] == 16
    assert torch.equal(fast, slow["out"]) if not on_gpu else close(fast, slow["out"])
    assert close(slow["out"], slow["formula"], rel=rel_tolerance("qwen_image", on_gpu, 1e-5))


def test_qwen_image_edit_weight_zero_is_the_stock_ksampler_with_the_reference(comfy, monkeypatch, edit_images):
    """Domain weight 0 with the edit conditioning is the host's KSampler bit for bit; the reference counts."""
    prompt, _ = qwen_edit("image_loaded_twice", weight=0.0)
    ref = run(comfy, monkeypatch, stock_ksampler(prompt))["out"]
    assert torch.equal(run(comfy, monkeypatch, prompt)["out"], ref)
    other = qwen_edit("image_loaded_twice", weight=0.0, extra={"image": {"class_type": "EmptyImage", "inputs": {
        "width": 64, "height": 64, "batch_size": 1, "color": 0x20C040}}})[0]
    assert not close(run(comfy, monkeypatch, other)["out"], ref, rel=1e-4)


# -- Chroma: no guidance embedding in the checkpoint ------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_chroma_every_row_at_the_hosts_default_guidance(comfy, monkeypatch, on_gpu, fast):
    """Chroma's approximator reads a guidance value the host sets to 0 where the conditioning has none. As its
    template runs it (cfg 3.5, a real negative, no FluxGuidance), c, n, u and d are all at 0, also when the
    empty prompt carries a FluxGuidance of its own (here 3.5, e.g. reused from a Flux.1 graph): the domain
    term is measured at the prompt's guidance. The samples are the formula's with the empty prompt at 0."""
    base, domain = fam.family_model("chroma", 0), fam.family_model("chroma", 1)
    base_calls, domain_calls = [], []
    record_calls(monkeypatch, base, base_calls)
    record_calls(monkeypatch, domain, domain_calls)
    prompt = graph("chroma", cfg=3.5, guidance={"null": 3.5}, domain=("dom", 0), domain_scale=1.2)
    out = run(comfy, monkeypatch, prompt, fast=fast)["out"]
    assert domain_calls == per_step({"rows": 1, "refs": 0, "guidance": [0.0]}, on_gpu, fast)
    assert base_calls == per_step({"rows": 3, "refs": 0, "guidance": [0.0]}, on_gpu, fast)
    oracle = run(comfy, monkeypatch, {**prompt, **custom_sampling(formula_guider(1.2, cfg=3.5, null=("null_0", 0)), "formula"),
                                      "null_0": cond("chroma", "")})["formula"]
    assert close(out, oracle, rel=rel_tolerance("chroma", on_gpu, 1e-5))
    at_3_5 = run(comfy, monkeypatch, {**prompt, **custom_sampling(formula_guider(1.2, cfg=3.5), "formula")})["formula"]
    assert not close(at_3_5, oracle, rel=1e-4)  # the empty prompt's own 3.5 would have counted


# -- HunyuanImage 2.1: glyph features of quoted text ------------------------------------------------------

def test_hunyuan_image_quoted_text_glyphs_reach_the_prompts_row_only(comfy, monkeypatch, caplog, on_gpu):
    """A prompt quoting text gets ByT5 glyph features from HunyuanImage 2.1's encoder (the negative and the
    empty prompt none): c is computed with them, n, u and d without, as each is wired; the samples are the
    formula's, on the fast path as on the straightforward one."""
    calls = {"base": [], "domain": []}
    for name, seed in (("base", 0), ("domain", 1)):  # (rows, with glyph features) per call
        record_calls(monkeypatch, fam.family_model("hunyuan_image", seed), calls[name],
                     read=lambda x, args, kwargs: (x.shape[0], kwargs.get("txt_byt5") is not None))
    prompt = graph("hunyuan_image", positive='a sign that says "open"', domain=("dom", 0), domain_scale=1.2)
    slow = run(comfy, monkeypatch, {**prompt, **custom_sampling(formula_guider(1.2), "formula")}, fast=False)
    caplog.clear()
    calls["base"].clear(), calls["domain"].clear()
    fast = run(comfy, monkeypatch, prompt, fast=True)["out"]
    assert calls["domain"] == per_step((1, False), on_gpu)
    assert sorted(calls["base"]) == sorted([(1, True), (2, False)] * STEPS)  # c alone, n and u together, per step
    assert path_lines(caplog, on_gpu) == [
        "domain 'domain_model': fast path (recorded)",
        "base model (3 rows): straightforward path (the host's call was not one model call on all rows (2 calls))"]
    assert torch.equal(fast, slow["out"]) if not on_gpu else close(fast, slow["out"])
    assert close(slow["out"], slow["formula"], rel=rel_tolerance("hunyuan_image", on_gpu, 1e-5))
    plain = run(comfy, monkeypatch, graph("hunyuan_image", positive="a sign that says open", domain=("dom", 0),
                                          domain_scale=1.2))["out"]
    assert not close(plain, fast, rel=1e-4)  # (another prompt, and the glyphs: the check has teeth)


# -- Wan 2.2: video latents, the TI2V 5B's start frame, the A14B's two experts ----------------------------

def first_timesteps(x, args, kwargs) -> tuple:
    """A Wan call's rows and the timesteps of its first row (one per latent frame under a noise mask)."""
    return x.shape[0], tuple(round(float(t), 3) for t in args[0][0].flatten())


def test_wan22_5b_start_frame_every_row_at_the_masks_per_frame_timesteps(comfy, monkeypatch, caplog, on_gpu):
    """Wan 2.2 TI2V 5B from a start image (the host's Wan22ImageToVideoLatent: the image's latent in frame 0
    and a noise mask that keeps it): 5-D latents of 48 channels; c, n, u and d all get the mask's per-frame
    timesteps (frame 0 at 0); the kept frame is the stock KSampler's; weight 0 is the stock KSampler bit for
    bit; a full-copy domain's samples are the formula's, on the fast path as on the straightforward one."""
    start = {**image_nodes("wan22_5b"),
             "latent": {"class_type": "Wan22ImageToVideoLatent", "inputs": {
                 "vae": ["vae", 0], "width": 64, "height": 64, "length": 5, "batch_size": 1, "start_image": ["image", 0]}}}
    calls = {"base": [], "domain": []}
    for name, seed in (("base", 0), ("domain", 1)):
        record_calls(monkeypatch, fam.family_model("wan22_5b", seed), calls[name], read=first_timesteps)
    stock = run(comfy, monkeypatch, graph("wan22_5b", sampler="KSampler", extra=start))["out"]
    assert torch.equal(run(comfy, monkeypatch, graph("wan22_5b", domain=("dom", 0), domain_scale=0.0, extra=start))["out"],
                       stock)
    prompt = graph("wan22_5b", domain=("dom", 0), domain_scale=1.2, extra=start)
    slow = run(comfy, monkeypatch, {**prompt, **custom_sampling(formula_guider(1.2), "formula")}, fast=False)
    caplog.clear()
    calls["base"].clear(), calls["domain"].clear()
    fast = run(comfy, monkeypatch, prompt, fast=True)["out"]

    assert fast.shape == (1, 48, 2, 4, 4)
    # rows per call (on a GPU Wan's calls are made directly: its forward copies from the CPU, NO_CAPTURE)
    assert [c[0] for c in read_calls(calls["base"])] == [3] * STEPS
    assert [c[0] for c in read_calls(calls["domain"])] == [1] * STEPS
    timesteps = {name: [t for _, t in read_calls(c)] for name, c in calls.items()}
    assert timesteps["domain"] == timesteps["base"]  # the same per-frame timesteps as the base
    assert all(t[0] == 0.0 and t[1] > 0.0 for t in timesteps["base"])  # frame 0 kept, frame 1 denoised
    assert path_lines(caplog, on_gpu, "wan22_5b") == ["domain 'domain_model': fast path (recorded)",
                                                      "base model (3 rows): fast path (recorded)"]
    assert torch.equal(fast[:, :, 0], stock[:, :, 0]) and not close(fast[:, :, 1:], stock[:, :, 1:], rel=1e-3)
    assert torch.equal(fast, slow["out"]) if not on_gpu else close(fast, slow["out"])
    assert close(slow["out"], slow["formula"], rel=rel_tolerance("wan22_5b", on_gpu, 1e-5))


def test_wan22_a14b_two_experts_one_domain_each_switched_at_the_hosts_step(comfy, monkeypatch, caplog, on_gpu):
    """The A14B's two experts with the pack's nodes: SamplerCustomAdvanced + SplitSigmas + one Domain Guider
    per expert, each with its own domain. Domain weight 0 (domains wired) is the host's two-KSamplerAdvanced
    template bit for bit (as the same chain with CFGGuider is); at weight 1 the high-noise expert and its domain
    run exactly the template's first two steps (its noise levels), the low-noise expert and its domain the
    rest, and the samples are the formula's per expert (fast path and straightforward alike)."""
    stock = run(comfy, monkeypatch, wan_experts("stock"))["out"]
    assert stock.shape == (1, 16, 2, 8, 8)
    assert torch.equal(run(comfy, monkeypatch, wan_experts("cfg"))["out"], stock)
    assert torch.equal(run(comfy, monkeypatch, wan_experts("domain", weight=0.0))["out"], stock)

    models = {"high": 0, "dom_high": 1, "low": 2, "dom_low": 3}
    calls = {name: [] for name in models}
    for name, seed in models.items():
        record_calls(monkeypatch, fam.family_model("wan22_a14b", seed), calls[name], read=first_timesteps)
    run(comfy, monkeypatch, wan_experts("stock"))
    stock_steps = {name: sorted({t for _, t in c}, reverse=True) for name, c in calls.items() if c}
    assert list(stock_steps) == ["high", "low"] and len(stock_steps["high"]) == SWITCH
    assert len(stock_steps["low"]) == EXPERT_STEPS - SWITCH and min(stock_steps["high"]) > max(stock_steps["low"])

    slow = run(comfy, monkeypatch, wan_experts("domain"), fast=False)["out"]
    formula = run(comfy, monkeypatch, wan_experts("formula"))["out"]
    for c in calls.values():
        c.clear()
    caplog.clear()
    fast = run(comfy, monkeypatch, wan_experts("domain"), fast=True)["out"]
    steps = {name: sorted({t for _, t in read_calls(c)}, reverse=True) for name, c in calls.items()}
    if not on_gpu:  # (a CUDA graph replays later steps without entering Python)
        assert steps == {"high": stock_steps["high"], "dom_high": stock_steps["high"],
                         "low": stock_steps["low"], "dom_low": stock_steps["low"]}
    assert path_lines(caplog, on_gpu, "wan22_a14b") == ["domain 'domain_model': fast path (recorded)",
                                                        "base model (3 rows): fast path (recorded)"] * 2
    assert torch.equal(fast, slow) if not on_gpu else close(fast, slow)
    assert close(slow, formula, rel=rel_tolerance("wan22_a14b", on_gpu, 1e-5))
    assert not close(slow, stock, rel=1e-3)  # the domains count
