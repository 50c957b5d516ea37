"""The GPU's dtypes, caught on the CPU.

On an NVIDIA GPU the host keeps the UNet's weights in fp16 or bf16 and calls it without a manual
cast; on the CPU it keeps float32 and casts nothing. The tiny model loaded "fp16 without cast"
(tests/support/tiny_nodes.py UNET_DTYPES) is the GPU's model on the CPU, so that a dtype mismatch fails
CI without a GPU. (CPU torch cannot run half-precision GroupNorm under autocast, so the cases
here are those without autocast over half weights: LoRA in fp32, and the float32 full copy.)
"""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.support import tiny_nodes as tiny
from tests.support.graphs import saved, text_to_image, train_graph
from test_host_training import shown_losses

GPU_LIKE = "fp16 without cast"




def host_state(model) -> dict:
    """What training must give back as it found it: the weights (values, dtypes, objects' flags)
    and the host's cast flags, hooks and patches."""
    unet = model.model.diffusion_model
    return {
        "weights": {k: torch.empty_like(v, device="cpu").copy_(v) for k, v in unet.state_dict(keep_vars=True).items()},
        "cast": sorted(n for n, m in unet.named_modules() if getattr(m, "comfy_cast_weights", False)),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()),
        "grad": sorted(n for n, p in unet.named_parameters() if p.requires_grad),
        "patches": sorted(model.patches),
    }


def assert_same_state(before: dict, after: dict):
    assert after["cast"] == before["cast"] and after["hooks"] == before["hooks"]
    assert after["grad"] == before["grad"] and after["patches"] == before["patches"]
    assert after["weights"].keys() == before["weights"].keys()
    for k, v in before["weights"].items():
        assert after["weights"][k].dtype == v.dtype and torch.equal(after["weights"][k], v), k


def test_the_gpu_like_model_is_half_precision_without_manual_cast(comfy):
    model = tiny.tiny_model(GPU_LIKE)
    assert model.model.get_dtype() == torch.float16 and model.model.manual_cast_dtype is None
    assert not any(getattr(m, "comfy_cast_weights", False) for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("mode, precision, preview_every", [
    ("lora", "fp32", 2),  # was: "mat1 and mat2 must have the same dtype, but got Float and Half"
    ("full", "fp32", 2),  # was: "mat1 and mat2 must have the same dtype, but got Half and Float" (the preview)
])
def test_training_on_fp16_weights_without_manual_cast(comfy, folders, monkeypatch, mode, precision, preview_every):
    monkeypatch.setattr(comfy.pack("nodes.training.progress"), "PREVIEW_STEPS", 2)  # fp16 on the CPU is slow
    model = tiny.tiny_model(GPU_LIKE)
    before = host_state(model)
    name = f"gpu_like_{mode}_{precision}_{preview_every}"
    comfy.run(train_graph(unet_dtype=GPU_LIKE, mode=mode, training_dtype=precision, preview_every=preview_every,
                          steps=2, checkpoint_every=0, save_name=name, resume=False))
    weights = load_file(saved(name + ".safetensors"))
    assert weights and all(torch.isfinite(v.float()).all() for v in weights.values())
    if mode == "full":
        assert weights["input_blocks.0.0.weight"].dtype == torch.float16  # the base's storage dtype
    if preview_every:
        import folder_paths
        previews = os.listdir(os.path.join(folder_paths.get_output_directory(), "indomain_previews", name))
        assert previews == ["step_000002.png"]
    assert_same_state(before, host_state(model))


def test_lora_in_fp32_on_fp16_weights_computes_what_the_float32_model_does(comfy, folders):
    """The half weights are cast up to the fp32 activations layer by layer: the losses are those of
    the float32 model (up to the weights' fp16 rounding)."""
    losses = {}
    for dtype in (GPU_LIKE, "host default"):
        comfy.run(train_graph(unet_dtype=dtype, mode="lora", training_dtype="fp32", steps=2, checkpoint_every=0,
                              save_name="fp32_loss", resume=False))
        losses[dtype] = shown_losses(comfy)
    assert len(losses[GPU_LIKE]) == 2
    assert losses[GPU_LIKE] == pytest.approx(losses["host default"], rel=1e-2)


def test_sampling_with_a_domain_on_fp16_weights_without_manual_cast(comfy):
    """KSampler (Domain Guidance) on the GPU's dtypes: domain weight 0 is the stock KSampler bit for
    bit, and a domain model (the same fp16 model wired in twice) adds nothing."""
    ckpt = {"ckpt": {"class_type": "TestTinyCheckpoint", "inputs": {"ckpt_name": "tiny", "unet_dtype": GPU_LIKE}}}
    stock = comfy.run(text_to_image(sampler="KSampler", steps=2, extra=ckpt))["captured"]["out"]["samples"]
    for scale in (0.0, 1.5):
        ours = comfy.run(text_to_image(steps=2, domain=["ckpt", 0], domain_scale=scale, extra=ckpt))["captured"]["out"]["samples"]
        assert torch.equal(ours, stock)
