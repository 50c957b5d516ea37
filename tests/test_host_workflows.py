"""Every workflow a user drags in from example_workflows/ (the Templates dialog) executes in the host, with tiny models substituted."""
import glob
import json
import os

import pytest
from PIL import Image

import tiny_nodes as tiny
from workflow_api import to_api

WORKFLOWS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "example_workflows", "*.json")))


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 5


@pytest.fixture(scope="module")
def substitutes(comfy):
    tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), "wf_domain.safetensors"), tiny.domain_state_dict())
    tiny.write_safetensors(os.path.join(comfy.model_dir("controlnet"), "wf_cn.safetensors"), tiny.controlnet_state_dict())
    import folder_paths
    for name in ("control_hint.png", "source.png", "my_domain_images/a.png", "my_domain_images/b.png"):
        path = os.path.join(folder_paths.get_input_directory(), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (64, 64), (200, 120, 40)).save(path)
    return {"InDomainUNetLoader": {"unet_name": "wf_domain.safetensors"},
            "InDomainTrainUNet": {"resolution": 64, "batch_size": 2, "save_name": "wf_trained"},
            "ControlNetLoader": {"control_net_name": "wf_cn.safetensors"},
            "EmptyLatentImage": {"width": 64, "height": 64}}


def shrink(prompt, substitutes):
    """Tiny models for the user's checkpoints, small images and few steps; the graph is unchanged."""
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "TestTinyCheckpoint"
            node["inputs"] = {"ckpt_name": "tiny"}
        node["inputs"].update(substitutes.get(node["class_type"], {}))
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 3
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_executes_and_saves_an_image(comfy, substitutes, path):
    with open(path) as f:
        workflow = json.load(f)
    prompt = shrink(to_api(workflow, comfy.nodes), substitutes)
    assert any(n["class_type"].startswith("InDomain") for n in prompt.values())
    result = comfy.run(prompt)
    images = [img for out in result["ui"].values() for img in out.get("images", []) if img.get("type") == "output"]
    assert images, "the workflow saved no image"
    import folder_paths
    saved = os.path.join(folder_paths.get_output_directory(), images[0].get("subfolder", ""), images[0]["filename"])
    assert Image.open(saved).size == (64, 64)
