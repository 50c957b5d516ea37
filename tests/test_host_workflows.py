"""Every workflow a user drags in from example_workflows/ (the Templates dialog) executes in the host, with tiny models substituted.

The substitutes stand in for the loaders only; every other node runs as the file has it. A workflow's
model family is read from the files its loaders name (FAMILY_FILES): SD1.5's checkpoint is the tiny SD1
checkpoint (TestTinyCheckpoint, a real CLIP); SDXL's checkpoint and Flux.1 dev's Load Diffusion Model are
tiny random-weight models of the host's own classes (tests/support/tiny_families.py) whose text encoders
(TestFamilyCLIP, under the host's own CLIPTextEncode) give conditioning of the family's widths, and whose
VAE is a tiny TAESD of the family's latent channels; a domain file is a LoRA of that family.
"""
import glob
import json
import os

import pytest
from PIL import Image

from tests.support import tiny_families as fam
from tests.support import tiny_nodes as tiny
from tests.support.workflow_api import to_api

WORKFLOWS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "example_workflows", "*.json")))

# The base model files the templates name -> the family of the tiny model that stands in (None: SD1).
FAMILY_FILES = {"v1-5-pruned-emaonly.safetensors": None, "sd_xl_base_1.0.safetensors": "sdxl",
                "flux1-dev.safetensors": "flux_dev"}
BASE_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}
TEXT_ENCODER_LOADERS = ("DualCLIPLoader", "CLIPLoader")


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 9


def test_sdxl_and_flux_each_have_a_text_to_image_and_a_train_then_sample_template(comfy):
    kinds = {}
    for path in WORKFLOWS:
        with open(path) as f:
            prompt = to_api(json.load(f), comfy.nodes)
        types = {n["class_type"] for n in prompt.values()}
        kind = "train" if "InDomainTrainUNet" in types else "sample" if "InDomainUNetLoader" in types else None
        kinds.setdefault(family_of(prompt), set()).add(kind)
    assert {"sample", "train"} <= kinds["sdxl"] and {"sample", "train"} <= kinds["flux_dev"], kinds


def family_of(prompt) -> str | None:
    families = {FAMILY_FILES[n["inputs"][BASE_LOADERS[n["class_type"]]]]
                for n in prompt.values() if n["class_type"] in BASE_LOADERS}
    assert len(families) == 1, families
    return families.pop()


@pytest.fixture(scope="module")
def substitutes(comfy):
    fam.register()
    domains = comfy.model_dir("domain_unets")
    tiny.write_safetensors(os.path.join(domains, "wf_domain.safetensors"), tiny.domain_state_dict())
    for family in FAMILY_FILES.values():
        if family is not None:
            tiny.write_safetensors(os.path.join(domains, f"wf_{family}_lora.safetensors"), fam.lora_state_dict(family))
    tiny.write_safetensors(os.path.join(comfy.model_dir("controlnet"), "wf_cn.safetensors"), tiny.controlnet_state_dict())
    import folder_paths
    for name in ("control_hint.png", "source.png", "my_domain_images/a.png", "my_domain_images/b.png"):
        path = os.path.join(folder_paths.get_input_directory(), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (64, 64), (200, 120, 40)).save(path)
    return {"InDomainTrainUNet": {"resolution": 64, "batch_size": 2},
            "ControlNetLoader": {"control_net_name": "wf_cn.safetensors"},
            "EmptyLatentImage": {"width": 64, "height": 64},
            "EmptySD3LatentImage": {"width": 64, "height": 64}}


def shrink(prompt, substitutes, name):
    """Tiny models for the user's model files, small images and few steps; the graph is unchanged."""
    family = family_of(prompt)
    for node in prompt.values():
        kind = node["class_type"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = (("TestTinyCheckpoint", {"ckpt_name": "tiny"}) if family is None
                                                  else ("TestFamilyCheckpoint", {"family": family}))
        elif kind == "UNETLoader":
            node["class_type"], node["inputs"] = "TestFamilyModel", {"family": family, "seed": 0}
        elif kind in TEXT_ENCODER_LOADERS:
            node["class_type"], node["inputs"] = "TestFamilyCLIP", {"family": family}
        elif kind == "VAELoader":
            node["class_type"], node["inputs"] = "TestTinyTAESD", {"latent_channels": fam.LATENT_CHANNELS[family]}
        elif kind == "InDomainUNetLoader":
            node["inputs"]["unet_name"] = "wf_domain.safetensors" if family is None else f"wf_{family}_lora.safetensors"
        elif kind == "InDomainTrainUNet":
            node["inputs"]["save_name"] = f"wf_{name}"
        node["inputs"].update(substitutes.get(kind, {}))
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 3
        if node["inputs"].get("preview_every"):
            node["inputs"]["preview_every"] = 3  # a preview at the last step, as the template shows them
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_executes_and_saves_an_image(comfy, substitutes, path):
    with open(path) as f:
        workflow = json.load(f)
    name = os.path.basename(path)[:-5]
    prompt = shrink(to_api(workflow, comfy.nodes), substitutes, name)
    assert any(n["class_type"].startswith("InDomain") for n in prompt.values())
    result = comfy.run(prompt)
    images = [img for out in result["ui"].values() for img in out.get("images", []) if img.get("type") == "output"]
    assert images, "the workflow saved no image"
    import folder_paths
    saved = os.path.join(folder_paths.get_output_directory(), images[0].get("subfolder", ""), images[0]["filename"])
    assert Image.open(saved).size == (64, 64)
    for node in prompt.values():  # a training node showed its preview (of the family's model, at the last step)
        if node["class_type"] == "InDomainTrainUNet" and node["inputs"].get("preview_every"):
            preview = os.path.join(folder_paths.get_output_directory(), "indomain_previews", node["inputs"]["save_name"],
                                   "step_000003.png")
            assert Image.open(preview).size == (64, 64)
