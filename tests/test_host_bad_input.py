"""Bad model files end in clear errors that name the file and what was expected."""
import os

import pytest

import tiny_nodes as tiny
from graphs import loader, text_to_image
from host import HostError


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
