"""Bad model files end in clear errors that name the file and what was expected."""
import os

import pytest

from tests.support import tiny_nodes as tiny
from tests.support.graphs import loader, text_to_image
from tests.support.host import HostError


def error_of(comfy, prompt) -> str:
    with pytest.raises(HostError) as e:
        comfy.run(prompt)
    return e.value.exception_message


def put(comfy, name, data: bytes | dict):
    path = os.path.join(comfy.model_dir("domain_unets"), name)
    if isinstance(data, dict):
        tiny.write_safetensors(path, data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return name


def with_domain(name, base=("ckpt", 0)):
    return text_to_image(domain=["dom", 0], extra={"dom": loader(name, base=base)})


def test_corrupt_safetensors_names_the_file(comfy):
    name = put(comfy, "broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    msg = error_of(comfy, with_domain(name))
    assert "broken.safetensors" in msg and "corrupt" in msg


def test_truncated_file_names_the_file(comfy):
    path = tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), "full.safetensors"), tiny.domain_state_dict())
    data = open(path, "rb").read()
    name = put(comfy, "truncated.safetensors", data[: len(data) // 2])
    msg = error_of(comfy, with_domain(name))
    assert "truncated.safetensors" in msg and "corrupt or incomplete" in msg


def test_pickled_checkpoints_are_refused_unopened(comfy):
    # The loader's file list shows only safetensors; a pickle under another name is refused by extension.
    put(comfy, "evil.ckpt", b"\x80\x04not opened")
    assert "evil.ckpt" not in comfy.nodes["InDomainUNetLoader"].GET_SCHEMA().inputs[0].options
    loader_mod = comfy.pack("nodes.domain_files")
    with pytest.raises(loader_mod.DomainModelError, match="evil.ckpt.*not a .safetensors file"):
        loader_mod.read_safetensors(os.path.join(comfy.model_dir("domain_unets"), "evil.ckpt"))


def test_another_family_is_an_error_naming_both(comfy):
    name = put(comfy, "sd2_domain.safetensors", tiny.unet_state_dict(5, "sd2"))
    msg = error_of(comfy, with_domain(name))
    assert "sd2_domain.safetensors" in msg and "SD20" in msg and "SD15" in msg


def test_not_a_diffusion_model(comfy):
    name = put(comfy, "random_tensors.safetensors", {"foo.weight": tiny.unet_state_dict(0)["out.2.weight"]})
    msg = error_of(comfy, with_domain(name))
    assert "random_tensors.safetensors" in msg and "not a diffusion model" in msg


def test_lora_matching_nothing(comfy):
    lora = {k.replace("diffusion_model.", "diffusion_model.nonexistent_"): v for k, v in tiny.lora_state_dict().items()}
    name = put(comfy, "alien_lora.safetensors", lora)
    msg = error_of(comfy, with_domain(name))
    assert "alien_lora.safetensors" in msg and "matches no weight" in msg


def test_lora_without_base_model(comfy):
    name = put(comfy, "lonely_lora.safetensors", tiny.lora_state_dict())
    msg = error_of(comfy, with_domain(name, base=None))
    assert "lonely_lora.safetensors" in msg and "base_model" in msg


def test_empty_interval_is_refused(comfy):
    name = put(comfy, "ok_domain.safetensors", tiny.domain_state_dict())
    p = with_domain(name)
    p["sample"]["inputs"].update(domain_start=0.8, domain_end=0.2)
    msg = error_of(comfy, p)
    assert "start_percent=0.8" in msg and "end_percent=0.2" in msg


# --- inputs to sampling that do not fit the base model: refused before the first step ----------

def guider_graph(**extra):
    """Domain Guider -> SamplerCustomAdvanced on the tiny checkpoint (4 Euler steps)."""
    p = text_to_image(extra=extra)
    p["guider"] = {"class_type": "InDomainGuider", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "null_conditioning": ["null", 0],
        "cfg": 5.0, "domain_scale": 1.0, "domain_start": 0.0, "domain_end": 1.0, "control_in_domain": False}}
    p.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["ksel", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
    })
    return p


@pytest.mark.parametrize("node", ["InDomainKSampler", "InDomainGuider"])
@pytest.mark.parametrize("which", ["null_conditioning", "positive"])
def test_conditioning_of_another_text_width_names_the_input(comfy, node, which):
    """A prompt encoded by a CLIP of another width (96 here; the tiny SD1.5 model takes 768)."""
    name = put(comfy, "ok_domain.safetensors", tiny.domain_state_dict())
    extra = {"dom": loader(name), "wide": {"class_type": "TestConditioning", "inputs": {"width": 96}}}
    p = text_to_image(domain=["dom", 0], extra=extra) if node == "InDomainKSampler" else guider_graph(**extra)
    if node == "InDomainGuider":
        p["guider"]["inputs"]["domain_model"] = ["dom", 0]
    p["sample" if node == "InDomainKSampler" else "guider"]["inputs"][which] = ["wide", 0]
    with pytest.raises(HostError) as e:
        comfy.run(p)
    assert e.value.detail["node_type"] == node  # refused by the node, before sampling started
    msg = e.value.exception_message
    assert msg.startswith(f"{which}:") and "96 wide" in msg and "SD15" in msg and "768" in msg and "CLIP" in msg


def sd2_domain_unloaded(comfy):
    """The SD2-family domain file, loaded without base_model (so the loader cannot check it)."""
    return loader(put(comfy, "sd2_domain.safetensors", tiny.unet_state_dict(5, "sd2")), base=None)


def test_a_domain_model_of_another_family_wired_straight_in_names_domain_model(comfy):
    msg = error_of(comfy, text_to_image(domain=["dom", 0], extra={"dom": sd2_domain_unloaded(comfy)}))
    assert msg.startswith("domain_model ") and "SD20" in msg and "SD15" in msg and "same family" in msg


def test_a_domain_term_of_another_family_names_its_term(comfy):
    extra = {"dom": sd2_domain_unloaded(comfy),
             "t0": {"class_type": "InDomainTerm", "inputs": {"domain_model": ["dom", 0], "weight": 1.0,
                                                            "start_percent": 0.0, "end_percent": 1.0}}}
    p = text_to_image(extra=extra)
    p["sample"]["inputs"]["more_domains"] = ["t0", 0]
    msg = error_of(comfy, p)
    assert msg.startswith("more_domains term0 ") and "SD20" in msg and "SD15" in msg


def test_a_domain_model_of_another_architecture_from_the_hosts_unet_loader_names_what_differs(comfy):
    """An SD1.5-family UNet with two blocks per stage (the tiny base has one), read by the host's
    own Load Diffusion Model."""
    import folder_paths
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = {**tiny.UNET_CONFIG, "num_res_blocks": [2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1]}
    with tiny.plain_weights():
        unet = tiny.randomize_(UNetModel(**config, dtype=tiny.torch.float32, device="cpu"), seed=6)
    name = put(comfy, "two_blocks.safetensors", unet.state_dict())
    folder_paths.add_model_folder_path("diffusion_models", comfy.model_dir("domain_unets"))
    extra = {"dom": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}
    msg = error_of(comfy, text_to_image(domain=["dom", 0], extra=extra))
    assert msg.startswith("domain_model ") and "another UNet architecture" in msg and "num_res_blocks" in msg
