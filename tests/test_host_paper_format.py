"""Load Domain UNet reads the authors' own domain checkpoints (issue 19): a null-text SD1.5 UNet in
diffusers layout, its cross-attention (attn2) removed and replaced by a constant feature per block
(nodes/paper_format.py). Files built here in that layout from the tiny UNet."""
import os

import pytest
import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image
from tests.support.host import HostError


def paper_file(comfy, name: str, drop_feature: bool = False) -> tuple[str, dict, dict]:
    """(file name, the host-keyed weights it came from, {host attn2 path: feature})."""
    from comfy.utils import unet_to_diffusers

    host_sd = tiny.domain_state_dict()
    mapping = unet_to_diffusers(tiny.tiny_model().model.model_config.unet_config)
    blocks = sorted({k.rsplit(".attn2.", 1)[0] for k in mapping if ".attn2." in k})
    g = torch.Generator().manual_seed(21)
    tensors, features = {}, {}
    for d, h in mapping.items():
        block_part = ".attn2." in d or any(d.startswith(b + ".norm2.") for b in blocks)
        if not block_part and h in host_sd:
            tensors[d] = host_sd[h]
    for i, block in enumerate(blocks):
        attn2 = mapping[f"{block}.attn2.to_out.0.weight"].rsplit(".to_out.0.weight", 1)[0]
        feature = torch.randn(1, 1, host_sd[attn2 + ".to_out.0.bias"].numel(), generator=g)
        features[attn2] = feature
        if not (drop_feature and i == 1):
            tensors[f"{block}.attn2.null_text_feature"] = feature
    assert not any(".attn2.to_" in k for k in tensors)
    path = tiny.write_safetensors(os.path.join(comfy.model_dir("domain_unets"), name), tensors)
    return os.path.basename(path), host_sd, features


def direct(host_sd: dict, features: dict, x, t, context):
    """The authors' block computed directly: the host's UNet with each attn2 returning its feature."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with tiny.plain_weights():
        unet = UNetModel(**tiny.UNET_CONFIG, dtype=torch.float32, device="cpu")
    unet.load_state_dict(host_sd)
    for path, feature in features.items():
        module = unet.get_submodule(path)
        module.forward = lambda h, *a, f=feature, **k: f.to(h.dtype).expand(h.shape[0], h.shape[1], -1)
    with torch.no_grad():
        return unet(x, t, context=context)


def test_a_null_text_unet_of_the_papers_code_loads_and_computes_what_its_code_computes(comfy):
    from comfy.model_management import load_models_gpu

    name, host_sd, features = paper_file(comfy, "paper_null_text.safetensors")
    prompt = {"ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}}, "dom": loader(name),
              "cap": {"class_type": "TestCapture", "inputs": {"value": ["dom", 0], "label": "dom"}}}
    domain = comfy.run(prompt)["captured"]["dom"]
    with torch.inference_mode():  # as the sampler loads it (the executor runs nodes in inference mode): on the GPU
        load_models_gpu([domain])  # in the GPU tier, in the host's dtype
    unet, device = domain.model.diffusion_model, domain.load_device
    dtype = domain.model.manual_cast_dtype or domain.model.get_dtype()
    host_sd = {k: v.to(dtype).float() for k, v in host_sd.items()}  # the direct side rounds alike
    features = {k: v.to(dtype).float() for k, v in features.items()}
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 100.0])
    context = torch.randn(2, 77, tiny.UNET_CONFIG["context_dim"], generator=g)  # any text: the blocks ignore it

    def run(c):
        with torch.inference_mode():
            return unet(x.to(device, dtype), t.to(device), context=c.to(device, dtype)).float().cpu()

    loaded = run(context)
    rel = {torch.float16: 3e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)  # fp32 on the CPU: exact up to rounding
    assert close(loaded, direct(host_sd, features, x, t, context), rel=rel)
    other = run(torch.zeros_like(context))  # text-free: another context gives the same output
    assert torch.equal(other, loaded)


def test_it_serves_as_the_domain_model_of_the_sampler(comfy):
    name, _, _ = paper_file(comfy, "paper_sampler.safetensors")
    stock = comfy.run(text_to_image(sampler="KSampler"))["captured"]["out"]["samples"]
    ours = comfy.run(text_to_image(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(name)}))["captured"]["out"]["samples"]
    assert torch.isfinite(ours).all() and not close(ours, stock, rel=1e-3)


def test_a_file_in_that_layout_without_its_features_is_refused_naming_the_block(comfy):
    name, _, _ = paper_file(comfy, "paper_incomplete.safetensors", drop_feature=True)
    with pytest.raises(HostError) as e:
        comfy.run(text_to_image(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(name)}))
    message = e.value.exception_message
    assert "paper_incomplete.safetensors" in message and "null_text_feature" in message and "transformer block" in message


def test_without_a_base_model_it_asks_for_one(comfy):
    name, _, _ = paper_file(comfy, "paper_nobase.safetensors")
    prompt = {"dom": loader(name, base=None), "cap": {"class_type": "TestCapture", "inputs": {"value": ["dom", 0], "label": "dom"}}}
    with pytest.raises(HostError) as e:
        comfy.run(prompt)
    assert "base_model" in e.value.exception_message and "paper_nobase.safetensors" in e.value.exception_message
