"""KSampler (Domain Guidance) and Domain Guider inside the real host, against its stock KSampler."""
import os

import pytest
import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image


@pytest.fixture(scope="module")
def files(comfy):
    """Domain UNet files in models/domain_unets: a trained-like domain, the base itself, a LoRA and its merge."""
    d = comfy.model_dir("domain_unets")
    lora = tiny.lora_state_dict()
    return {
        "domain": os.path.basename(tiny.write_safetensors(os.path.join(d, "domain.safetensors"), tiny.domain_state_dict())),
        "base_copy": os.path.basename(tiny.write_safetensors(os.path.join(d, "base_copy.safetensors"), tiny.unet_state_dict(0))),
        "lora": os.path.basename(tiny.write_safetensors(os.path.join(d, "domain_lora.safetensors"), lora)),
        "lora_merged": os.path.basename(tiny.write_safetensors(
            os.path.join(d, "lora_merged.safetensors"), tiny.merge_lora(tiny.unet_state_dict(0), lora))),
    }


def latent(comfy, prompt):
    return comfy.run(prompt)["captured"]["out"]["samples"]


@pytest.fixture(scope="module")
def stock(comfy):
    return latent(comfy, text_to_image(sampler="KSampler"))


def test_domain_scale_zero_is_ksampler_with_a_real_negative(comfy, files, stock):
    ours = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=0.0, extra={"dom": loader(files["domain"])}))
    assert torch.isfinite(stock).all() and stock.abs().max() > 0
    assert close(ours, stock)


def test_the_latent_comes_back_in_the_hosts_intermediate_dtype_as_ksamplers(comfy, files, monkeypatch):
    """ComfyUI 0.33 started with --fp16-intermediates: KSampler hands its LATENT on in fp16; so does
    KSampler (Domain Guidance), the same values."""
    import comfy.model_management as mm
    from comfy.cli_args import args

    if not hasattr(args, "fp16_intermediates") or not hasattr(mm, "intermediate_dtype"):
        pytest.skip("a host without --fp16-intermediates (before 0.33)")
    monkeypatch.setattr(args, "fp16_intermediates", True)
    stock16 = latent(comfy, text_to_image(sampler="KSampler", seed=11))
    ours = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=0.0, seed=11, extra={"dom": loader(files["domain"])}))
    assert stock16.dtype == torch.float16 and ours.dtype == torch.float16
    assert torch.equal(ours, stock16)


def test_domain_guidance_changes_the_sample(comfy, files, stock):
    ours = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=2.0, extra={"dom": loader(files["domain"])}))
    assert torch.isfinite(ours).all()
    assert (ours - stock).abs().max() > 1e-2 * stock.abs().max()


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_domain_equal_to_base_is_ksampler(comfy, files, stock, scale):
    # The base MODEL wired in twice, and the base's weights loaded from a file as a separate model.
    same = latent(comfy, text_to_image(domain=["ckpt", 0], domain_scale=scale))
    copy = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=scale, extra={"dom": loader(files["base_copy"])}))
    assert close(same, stock)
    assert close(copy, stock)


def test_cfg_zero_domain_one_is_the_domain_model_alone(comfy, files):
    ours = latent(comfy, text_to_image(negative="", cfg=0.0, domain=["dom", 0], domain_scale=1.0,
                                       extra={"dom": loader(files["domain"])}))
    alone = text_to_image(sampler="KSampler", positive="", negative="", cfg=1.0,
                          extra={"dom": loader(files["domain"], base=None)})
    alone["sample"]["inputs"]["model"] = ["dom", 0]
    assert close(ours, latent(comfy, alone))


def test_lora_domain_rides_on_the_base_and_equals_its_merged_weights(comfy, files):
    hooked = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["lora"])}))
    merged = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["lora_merged"])}))
    assert close(hooked, merged, rel=1e-4)


def test_guider_with_sampler_custom_advanced_equals_the_ksampler_node(comfy, files):
    extra = {
        "dom": loader(files["domain"]),
        "guider": {"class_type": "InDomainGuider", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "null_conditioning": ["null", 0],
            "cfg": 5.0, "domain_model": ["dom", 0], "domain_scale": 2.0, "domain_start": 0.0, "domain_end": 1.0,
            "control_in_domain": False}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}},
        "adv": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["ksel", 0], "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "cap2": {"class_type": "TestCapture", "inputs": {"value": ["adv", 0], "label": "adv"}},
    }
    out = comfy.run(text_to_image(domain=["dom", 0], domain_scale=2.0, extra=extra))["captured"]
    assert close(out["adv"]["samples"], out["out"]["samples"])


def test_several_domains_and_intervals(comfy, files, stock):
    def run(**kw):
        extra = {"dom": loader(files["domain"]), "lora": loader(files["lora"]),
                 "t1": {"class_type": "InDomainTerm", "inputs": {"domain_model": ["dom", 0], "weight": 1.0,
                                                                 "start_percent": kw.get("s1", 0.0), "end_percent": kw.get("e1", 1.0)}},
                 "t2": {"class_type": "InDomainTerm", "inputs": {"domain_model": ["lora", 0], "weight": kw.get("w2", 1.0),
                                                                 "start_percent": 0.0, "end_percent": 1.0, "previous": ["t1", 0]}}}
        p = text_to_image(domain=None, extra=extra)
        p["sample"]["inputs"]["more_domains"] = ["t2", 0]
        return latent(comfy, p)

    one_direct = latent(comfy, text_to_image(domain=["dom", 0], domain_scale=1.0, extra={"dom": loader(files["domain"])}))
    assert close(run(w2=0.0), one_direct)  # a chained term of weight 0 adds nothing
    both = run()
    assert not close(both, one_direct, rel=1e-3)  # the second domain counts
    # An interval that contains no sampling step (only sigma 0) leaves the term out entirely.
    lora_only = latent(comfy, text_to_image(domain=["lora", 0], domain_scale=1.0, extra={"lora": loader(files["lora"])}))
    assert close(run(s1=1.0, e1=1.0), lora_only)
    first_half = run(e1=0.5)
    assert not close(first_half, both, rel=1e-3) and not close(first_half, lora_only, rel=1e-3)


def test_batch_of_two_matches_ksampler_per_image(comfy, files):
    ours = latent(comfy, text_to_image(batch=2, domain=["dom", 0], domain_scale=0.0, extra={"dom": loader(files["domain"])}))
    stock = latent(comfy, text_to_image(batch=2, sampler="KSampler"))
    assert ours.shape[0] == 2 and close(ours, stock)
    guided = latent(comfy, text_to_image(batch=2, domain=["dom", 0], domain_scale=2.0, extra={"dom": loader(files["domain"])}))
    assert not close(guided[0], guided[1], rel=1e-3)  # different noise per image, as KSampler


def _img2img_extra(mask: bool):
    extra = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x8844cc}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["ckpt", 2]}},
    }
    if mask:
        extra["mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
        extra["hole"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
        extra["comp"] = {"class_type": "MaskComposite", "inputs": {"destination": ["mask", 0], "source": ["hole", 0],
                                                                   "x": 0, "y": 0, "operation": "add"}}
        extra["setmask"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["enc", 0], "mask": ["comp", 0]}}
    return extra


@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_img2img_and_inpainting_as_ksampler(comfy, files, mask):
    src = ["setmask", 0] if mask else ["enc", 0]

    def run(**kw):
        p = text_to_image(denoise=0.6, extra={**_img2img_extra(mask), "dom": loader(files["domain"]),
                                              "cap_src": {"class_type": "TestCapture", "inputs": {"value": ["enc", 0], "label": "src"}}}, **kw)
        p["sample"]["inputs"]["latent_image"] = src
        return comfy.run(p)["captured"]

    stock = run(sampler="KSampler")["out"]["samples"]
    zero = run(domain=["dom", 0], domain_scale=0.0)["out"]["samples"]
    assert close(zero, stock)
    guided = run(domain=["dom", 0], domain_scale=2.0)
    out, source = guided["out"]["samples"], guided["src"]["samples"]
    assert not close(out, stock, rel=1e-3)
    if mask:  # outside the mask (right half) the source latent is kept, as KSampler does
        assert torch.allclose(out[..., 4:], source[..., 4:], atol=1e-5)
        assert not torch.allclose(out[..., :4], source[..., :4], atol=1e-2)
