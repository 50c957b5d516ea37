"""What the pack does about ComfyUI 0.33's dynamic VRAM that can be shown on the CPU (the graphs
over the weight slots need a GPU: tests/test_gpu_dynamic_vram.py). Here the host's dynamic patcher
is emulated where it matters: `is_dynamic()` true, and a base without the host's reload recipe
(`cached_patcher_init`), as a custom loader gives it."""
import os

import pytest
import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import loader, text_to_image, train_graph, written
from tests.support.host import HostError
from tests.support.tiny_nodes import domain_images


@pytest.fixture
def dynamic_base_without_recipe(comfy, monkeypatch):
    import comfy.model_patcher

    if hasattr(comfy.model_patcher, "ModelPatcherDynamic"):  # 0.33+: the host itself then calls dynamic-only methods
        pytest.skip("emulated on hosts without dynamic VRAM (0.8.0); on 0.33 the GPU tier meets the real one")
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "is_dynamic", lambda self: True, raising=False)
    monkeypatch.setattr(tiny.tiny_model(), "cached_patcher_init", None, raising=False)


def test_a_weight_hook_domain_on_a_dynamic_base_without_a_reload_recipe_names_the_way_out(
        comfy, monkeypatch, dynamic_base_without_recipe):
    d = comfy.model_dir("domain_unets")
    tiny.write_safetensors(os.path.join(d, "dyn_lora.safetensors"), tiny.lora_state_dict(seed=5))
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "0")  # the LoRA as the host's weight hook
    with pytest.raises(HostError) as e:
        comfy.run(text_to_image(steps=1, domain=["dom", 0], domain_scale=1.5,
                                extra={"dom": loader("dyn_lora.safetensors")}))
    message = e.value.exception_message
    assert "domain 'domain_model'" in message and "weight hook" in message
    assert "Load Diffusion Model" in message and "--disable-dynamic-vram" in message


def test_training_on_a_dynamic_base_without_a_reload_recipe_is_refused_before_anything_is_written(
        comfy, dynamic_base_without_recipe):
    import folder_paths

    domain_images(os.path.join(folder_paths.get_input_directory(), "dyn_domain"))
    with pytest.raises(HostError) as e:
        comfy.run(train_graph(image_folder="dyn_domain", steps=1, save_name="dyn_refused", resume=False))
    message = e.value.exception_message
    assert message.startswith("model:") or "model: under ComfyUI's dynamic VRAM" in message
    assert "--disable-dynamic-vram" in message
    assert written("dyn_refused") == []


def test_a_layers_weights_are_cast_to_the_dtype_it_was_built_for(comfy):
    """The host's non-dynamic copy of a model loaded under dynamic VRAM keeps an fp32 file's weights in
    fp32 in an fp16 layer (lazy loading); fp16 activations then meet fp32 weights."""
    from comfy.ops import disable_weight_init

    settle = comfy.pack("nodes.dynamic_vram").settle_lazy_dtypes
    layer = disable_weight_init.Linear(8, 4, dtype=torch.float16)
    layer.weight = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)  # as the lazy load leaves it
    layer.bias = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    layer.weight_comfy_model_dtype = layer.bias_comfy_model_dtype = torch.float16  # what 0.33 records
    values = layer.weight.detach().clone()
    assert settle(torch.nn.Sequential(layer)) == 2
    assert layer.weight.dtype == layer.bias.dtype == torch.float16
    assert torch.equal(layer.weight.float(), values.half().float())
    assert settle(torch.nn.Sequential(layer)) == 0  # nothing left to cast
