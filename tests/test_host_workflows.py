"""Every workflow a user drags in from example_workflows/ (the Templates dialog) executes in the host, with tiny models substituted.

The substitutes stand in for the loaders only; every other node runs as the file has it. A workflow's
model family is read from the files its loaders name (FAMILY_FILES): SD1.5's checkpoint is the tiny SD1
checkpoint (TestTinyCheckpoint, a real CLIP); SDXL's checkpoint and Flux.1 dev's Load Diffusion Model are
tiny random-weight models of the host's own classes (tests/support/tiny_families.py) whose text encoders
(TestFamilyCLIP, under the host's own CLIPTextEncode) give conditioning of the family's widths, and whose
VAE is a tiny TAESD of the family's latent channels; a domain file is a LoRA of that family. So are the
newer families' (Qwen-Image and its Edit, Flux.2 dev, Wan 2.2 A14B's two experts, one model each), whose
VAE is the host's own class with random weights (TestHostVAE: Wan 2.1's at a tiny width for Qwen-Image's and
Wan's 5-D latents, which also encodes the Edit's picture; Flux.2's at its fixed width). The video template
saves a WEBM of 5 frames.
"""
import glob
import json
import os

import pytest
import torch
from PIL import Image

from tests.support import tiny_families as fam
from tests.support import tiny_nodes as tiny
from tests.support.workflow_api import to_api

WORKFLOWS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "example_workflows", "*.json")))

# The base model files the templates name -> the family of the tiny model that stands in (None: SD1).
FAMILY_FILES = {"v1-5-pruned-emaonly.safetensors": None, "sd_xl_base_1.0.safetensors": "sdxl",
                "flux1-dev.safetensors": "flux_dev", "qwen_image_fp8_e4m3fn.safetensors": "qwen_image",
                "qwen_image_edit_fp8_e4m3fn.safetensors": "qwen_image", "flux2_dev_fp8mixed.safetensors": "flux2",
                "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "wan22_a14b",
                "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "wan22_a14b"}
HOST_VAES = {"qwen_image": "wan2.1", "wan22_a14b": "wan2.1", "flux2": "flux2"}  # TestHostVAE's kind
NEWER = {"qwen_image", "flux2", "wan22_a14b"}  # the families users run now with a template
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
    assert all("sample" in kinds[family] for family in NEWER), kinds


def test_the_wan_template_switches_experts_as_the_hosts_does(comfy):
    """Wan 2.2 A14B: BasicScheduler -> SplitSigmas, the first SamplerCustomAdvanced (noise added) on the
    high sigmas with the high-noise expert's Domain Guider, the second (no noise added) on the low sigmas
    from the first's latent, with the low-noise expert's, each guider with the domain of its own expert."""
    path = next(p for p in WORKFLOWS if os.path.basename(p).startswith("wan22_14b"))
    with open(path) as f:
        prompt = to_api(json.load(f), comfy.nodes)
    samplers = sorted((n for n in prompt.values() if n["class_type"] == "SamplerCustomAdvanced"),
                      key=lambda n: n["inputs"]["sigmas"][1])
    assert len(samplers) == 2
    split = {prompt[n["inputs"]["sigmas"][0]]["class_type"] for n in samplers}
    assert split == {"SplitSigmas"}
    assert [prompt[n["inputs"]["noise"][0]]["class_type"] for n in samplers] == ["RandomNoise", "DisableNoise"]
    first_id = next(k for k, n in prompt.items() if n is samplers[0])
    assert samplers[1]["inputs"]["latent_image"] == [first_id, 0]
    experts = []
    for sampler in samplers:
        guider = prompt[sampler["inputs"]["guider"][0]]
        assert guider["class_type"] == "InDomainGuider"
        model, domain = guider["inputs"]["model"], prompt[guider["inputs"]["domain_model"][0]]
        assert domain["class_type"] == "InDomainUNetLoader" and domain["inputs"]["base_model"] == model
        experts.append(prompt[prompt[model[0]]["inputs"]["model"][0]]["inputs"]["unet_name"])
    assert ["high_noise" in experts[0], "low_noise" in experts[1]] == [True, True], experts


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
            "EmptySD3LatentImage": {"width": 64, "height": 64},
            "EmptyFlux2LatentImage": {"width": 64, "height": 64},
            "Flux2Scheduler": {"width": 64, "height": 64},  # (the latent's size, as the template has them)
            "EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 5},
            "SplitSigmas": {"step": 2}}  # the 20 steps switching at 10, scaled to 3 steps: 2 and 1


def shrink(prompt, substitutes, name):
    """Tiny models for the user's model files, small images and few steps; the graph is unchanged."""
    family = family_of(prompt)
    unets = sorted((k for k, n in prompt.items() if n["class_type"] == "UNETLoader"), key=int)  # (Wan's experts: 0, 2)
    for node_id, node in prompt.items():
        kind = node["class_type"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = (("TestTinyCheckpoint", {"ckpt_name": "tiny"}) if family is None
                                                  else ("TestFamilyCheckpoint", {"family": family}))
        elif kind == "UNETLoader":
            node["class_type"], node["inputs"] = "TestFamilyModel", {"family": family, "seed": 2 * unets.index(node_id)}
        elif kind in TEXT_ENCODER_LOADERS:
            node["class_type"], node["inputs"] = "TestFamilyCLIP", {"family": family}
        elif kind == "VAELoader" and family in HOST_VAES:
            node["class_type"], node["inputs"] = "TestHostVAE", {"kind": HOST_VAES[family]}
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
    if saved.endswith(".webm"):  # a video: 5 frames of 64 x 64 (2 latent frames, 4x in time as the Wan VAE decodes)
        import av

        with av.open(saved) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
        assert len(frames) == 5 and all(frame.size == (64, 64) for frame in frames)
    else:
        assert Image.open(saved).size == (64, 64)
    for node in prompt.values():  # a training node showed its preview (of the family's model, at the last step)
        if node["class_type"] == "InDomainTrainUNet" and node["inputs"].get("preview_every"):
            preview = os.path.join(folder_paths.get_output_directory(), "indomain_previews", node["inputs"]["save_name"],
                                   "step_000003.png")
            assert Image.open(preview).size == (64, 64)
        if node["class_type"] == "InDomainTrainUNet" and node["inputs"].get("validation_prompts"):  # and its grid
            grid = os.path.join(folder_paths.get_output_directory(), "indomain_previews", node["inputs"]["save_name"],
                                "validation_step_000003.png")
            rows, cols = len(node["inputs"]["validation_prompts"].splitlines()), 3
            layout = comfy.pack("nodes.training.samples").GridLayout(rows, cols, 64, 64)
            assert Image.open(grid).size == layout.size


# The newer families' templates but Qwen-Image Edit's, whose KSampler (Domain Guidance) at 0 is KSampler with
# the picture's reference in tests/test_host_families_newer.py (its megapixel reference, encoded by the host's
# VAE, takes tens of seconds here on a CPU; the template runs in test_workflow_executes_and_saves_an_image).
NEWER_TEMPLATES = [p for p in WORKFLOWS if os.path.basename(p).startswith(("qwen_image_text", "flux2", "wan22"))]


def as_hosts_template(prompt: dict) -> dict:
    """The host's own template the pack's was built from: KSampler where the KSampler (Domain Guidance) is;
    BasicGuider (cfg 1, Flux.2) or CFGGuider where a Domain Guider is; and for Wan 2.2 A14B, its two
    KSamplerAdvanced where a SamplerCustomAdvanced runs on SplitSigmas' high or low part (the first from
    step 0 to the split with the noise seed and leftover noise, the second from the split on, adding none)."""
    out = json.loads(json.dumps(prompt))
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "InDomainKSampler":
            out[node_id] = {"class_type": "KSampler", "inputs": {k: v for k, v in inputs.items() if k in (
                "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
                "denoise")}}
        elif node["class_type"] == "InDomainGuider":
            out[node_id] = ({"class_type": "BasicGuider", "inputs": {"model": inputs["model"], "conditioning": inputs["positive"]}}
                            if inputs["cfg"] == 1.0 else {"class_type": "CFGGuider", "inputs": {
                                k: inputs[k] for k in ("model", "positive", "negative", "cfg")}})
        elif node["class_type"] == "SamplerCustomAdvanced" and prompt[inputs["sigmas"][0]]["class_type"] == "SplitSigmas":
            split = prompt[inputs["sigmas"][0]]
            schedule = prompt[split["inputs"]["sigmas"][0]]["inputs"]
            guider = prompt[inputs["guider"][0]]["inputs"]
            noise = prompt[inputs["noise"][0]]
            first = inputs["sigmas"][1] == 0
            out[node_id] = {"class_type": "KSamplerAdvanced", "inputs": {
                "model": guider["model"], "positive": guider["positive"], "negative": guider["negative"],
                "cfg": guider["cfg"], "latent_image": inputs["latent_image"],
                "sampler_name": prompt[inputs["sampler"][0]]["inputs"]["sampler_name"],
                "scheduler": schedule["scheduler"], "steps": schedule["steps"],
                "add_noise": "enable" if noise["class_type"] == "RandomNoise" else "disable",
                "noise_seed": noise["inputs"].get("noise_seed", 0),
                "start_at_step": 0 if first else split["inputs"]["step"],
                "end_at_step": split["inputs"]["step"] if first else 10000,
                "return_with_leftover_noise": "enable" if first else "disable"}}
    return out


@pytest.mark.parametrize("path", NEWER_TEMPLATES, ids=[os.path.basename(p) for p in NEWER_TEMPLATES])
def test_a_newer_template_at_domain_scale_0_is_the_hosts_template_bit_for_bit(comfy, substitutes, path):
    """The families users run now: each template with every domain_scale at 0 samples what the host's own
    template samples (the sampled latent, bit for bit); at the template's domain_scale the domain moves it.
    (The latent is captured where the VAE decodes it; the three runs share the host's cache, so the Edit's
    picture is encoded once.)"""
    with open(path) as f:
        prompt = shrink(to_api(json.load(f), comfy.nodes), substitutes, os.path.basename(path)[:-5])
    decode = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode")
    samples = prompt[decode]["inputs"]["samples"]
    for node_id in [decode] + [k for k, n in prompt.items() if n["inputs"].get("images") == [decode, 0]]:
        del prompt[node_id]  # (the decoder and what saves its pictures)
    off = json.loads(json.dumps(prompt))
    for node in off.values():
        if node["class_type"].startswith("InDomain") and "domain_scale" in node["inputs"]:
            node["inputs"]["domain_scale"] = 0.0
    executor, out = comfy.executor(), {}
    for label, graph in (("host", as_hosts_template(prompt)), ("off", off), ("on", prompt)):
        graph["cap"] = {"class_type": "TestCapture", "inputs": {"value": samples, "label": label}}
        out[label] = comfy.run(graph, executor=executor)["captured"][label]["samples"]
    assert torch.equal(out["off"], out["host"])
    assert not torch.allclose(out["on"], out["host"], rtol=1e-3, atol=1e-4)
