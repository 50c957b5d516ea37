"""API-format prompt builders for the host tests (the shapes a user's graph has)."""
from __future__ import annotations

import copy


def close(a, b, rel=1e-5) -> bool:
    """max |a - b| <= rel * max |b|: the tolerance the issue sets for 'the same latents'."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def text_to_image(*, sampler="InDomainKSampler", positive="a photo of a cat", negative="blurry, low quality",
                  seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=64,
                  batch=1, domain=None, domain_scale=1.0, denoise=1.0, extra=None, label="out"):
    """Tiny checkpoint -> prompts -> (Domain) KSampler -> capture the LATENT.

    domain: None, or a node input link/value for domain_model (e.g. ["dom", 0]).
    """
    p = {
        "ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": positive}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": negative}},
        "null": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "cap": {"class_type": "TestCapture", "inputs": {"value": ["sample", 0], "label": label}},
    }
    inputs = {"model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
              "denoise": denoise}
    if sampler == "InDomainKSampler":
        inputs.update({"null_conditioning": ["null", 0], "domain_scale": domain_scale, "domain_start": 0.0,
                       "domain_end": 1.0, "control_in_domain": False})
        if domain is not None:
            inputs["domain_model"] = domain
    p["sample"] = {"class_type": sampler, "inputs": inputs}
    for k, v in (extra or {}).items():
        p[k] = copy.deepcopy(v)
    return p


def loader(unet_name, base=("ckpt", 0), strength=1.0):
    inputs = {"unet_name": unet_name, "lora_strength": strength}
    if base is not None:
        inputs["base_model"] = list(base)
    return {"class_type": "InDomainUNetLoader", "inputs": inputs}
