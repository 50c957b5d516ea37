"""ControlNet stays in the text term; optionally the domain term receives it too."""
import os

import pytest

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image


@pytest.fixture(scope="module")
def names(comfy):
    cn = tiny.write_safetensors(os.path.join(comfy.model_dir("controlnet"), "tiny_cn.safetensors"), tiny.controlnet_state_dict())
    dom = tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), "cn_domain.safetensors"), tiny.domain_state_dict())
    return os.path.basename(cn), os.path.basename(dom)


def run(comfy, names, strength, control_in_domain=False, sampler="InDomainKSampler", scale=2.0):
    cn, dom = names
    extra = {
        "dom": loader(dom),
        "cnl": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": cn}},
        "hint": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xffffff}},
        "apply": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cnl", 0], "image": ["hint", 0],
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0}},
    }
    p = text_to_image(sampler=sampler, domain=["dom", 0], domain_scale=scale, extra=extra)
    p["sample"]["inputs"]["positive"] = ["apply", 0]
    p["sample"]["inputs"]["negative"] = ["apply", 1]
    if sampler == "InDomainKSampler":
        p["sample"]["inputs"]["control_in_domain"] = control_in_domain
    return comfy.run(p)["captured"]["out"]["samples"]


def test_controlnet_changes_the_result_and_strength_zero_does_not(comfy, names):
    without = comfy.run(text_to_image(domain=["dom", 0], domain_scale=2.0, extra={"dom": loader(names[1])}))["captured"]["out"]["samples"]
    assert close(run(comfy, names, 0.0), without)
    assert not close(run(comfy, names, 1.0), without, rel=1e-3)


def test_domain_scale_zero_with_controlnet_is_ksampler_with_controlnet(comfy, names):
    assert close(run(comfy, names, 1.0, scale=0.0), run(comfy, names, 1.0, sampler="KSampler"))


def test_control_in_domain_option_gives_the_domain_term_the_control(comfy, names):
    text_only = run(comfy, names, 1.0, control_in_domain=False)
    both = run(comfy, names, 1.0, control_in_domain=True)
    assert not close(both, text_only, rel=1e-3)
