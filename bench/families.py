"""Full-size diffusion transformers of today's families for the GPU benchmarks (issue 17), random weights.

SD3.5 medium (MMDiT-X, 2.5B), Flux.1 dev (12B) and Z-Image (6B), each built with the host's own
classes from the config the host's model detection reads from the released checkpoints
(comfy/model_detection.py), so that a file of these weights is detected as the family it is when
the host loads it (comfy.sd.load_diffusion_model, as UNETLoader does). Weights are random (normal,
scaled by fan-in): speed and memory do not depend on their values. Conditioning has the shapes the
family's text encoders give: T5-XXL / CLIP (SD3.5, Flux), Qwen3-4B (Z-Image).

Used by bench/sampling.py (--models sd35m,flux_dev,zimage) and bench/training.py (--families ...).
"""
from __future__ import annotations

import torch

# name: host supported_models class, the model config (as detection spells it), weight dtype, latent channels,
# context tokens x width, pooled width (None: none), cfg users run (Flux dev and Z-Image Turbo: 1, guidance-distilled),
# Flux guidance (None: no guidance entry), LoRA target suffixes (the training row's; nodes/training/families.py),
# tiny: the tests' tiny model of the family (tests/support/tiny_families.py), for --quick.
FAMILIES = {
    "sd35m": dict(cls="SD3", tiny="sd3", dtype=torch.bfloat16, latent=16, tokens=154, context=4096, pooled=2048, cfg=4.5, guidance=None,
                  config=dict(in_channels=16, out_channels=16, patch_size=2, depth=24, input_size=None, adm_in_channels=2048,
                              context_embedder_config={"target": "torch.nn.Linear",
                                                       "params": {"in_features": 4096, "out_features": 1536}},
                              num_patches=147456, pos_embed_max_size=384, pos_embed_scaling_factor=None,
                              x_block_self_attn_layers=list(range(13)), qk_norm="rms"),
                  lora=("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
    "flux_dev": dict(cls="Flux", tiny="flux_dev", dtype=torch.bfloat16, latent=16, tokens=256, context=4096, pooled=768, cfg=1.0, guidance=3.5,
                     config=dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                                 axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                                 txt_ids_dims=[], yak_mlp=False, txt_norm=False),
                     lora=("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                           "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")),
    "zimage": dict(cls="ZImage", tiny="zimage", dtype=torch.bfloat16, latent=16, tokens=128, context=2560, pooled=None, cfg=1.0, guidance=None,
                   config=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30,
                               n_refiner_layers=2, qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                               axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                               z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
                   lora=("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")),
}


def host_config(name: str, config: dict | None = None):
    """The host's supported_models instance of the family (its dtype set as the host's loader sets it)."""
    import comfy.model_management as mm
    import comfy.supported_models

    spec = FAMILIES[name]
    cfg = getattr(comfy.supported_models, spec["cls"])(dict(config or spec["config"]))
    cfg.set_inference_dtype(spec["dtype"], mm.unet_manual_cast(spec["dtype"], mm.get_torch_device(), cfg.supported_inference_dtypes))
    return cfg


def random_state_dict(name: str, seed: int, device, config: dict | None = None) -> dict[str, torch.Tensor]:
    """The family's diffusion model state dict (host key names), seeded random weights in its dtype."""
    from tests.support.tiny_nodes import plain_weights

    spec = FAMILIES[name]
    with plain_weights(), torch.device(device):
        module = host_config(name, config).get_model({}, "", device=device).diffusion_model
    if torch.device(device).type == "meta":  # shapes only (e.g. to check what the host detects)
        return dict(module.state_dict())
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for k, v in sorted(module.state_dict().items()):
            if v.is_floating_point():
                fan_in = v[0].numel() if v.ndim > 1 else 1
                t = torch.empty(v.shape, device=device, dtype=torch.float32)
                t.normal_(0.0, 0.5 / fan_in ** 0.5 if v.ndim > 1 else 0.1, generator=g)
                sd[k] = t.to(spec["dtype"])
            else:
                sd[k] = v.clone()
    del module
    return sd


def tiny_config(name: str) -> dict:
    """The model config of the tests' tiny model of the family (--quick)."""
    from tests.support import tiny_families

    return tiny_families.FAMILIES[FAMILIES[name]["tiny"]]["unet"]


def write_file(name: str, path: str, device, quick: bool = False) -> dict[str, torch.Size]:
    """A random state dict of the family (the tiny one with `quick`) written to `path`; its shapes."""
    import safetensors.torch

    sd = random_state_dict(name, 0, "cpu" if quick else device, tiny_config(name) if quick else None)
    safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in sd.items()}, path)
    return {k: v.shape for k, v in sd.items()}


def load(name: str, path: str, quick: bool = False, dtype: torch.dtype | None = None):
    """The MODEL of a file write_file wrote: loaded as UNETLoader loads it (weight dtype `dtype`, None:
    the host's choice), checked to be detected as the family; with `quick` (too small for the host's
    detection) built from the tiny config instead."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import safetensors.torch

    if quick:
        model = host_config(name, tiny_config(name)).get_model({}, "")
        model.load_model_weights(safetensors.torch.load_file(path), "")
        return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher = comfy.sd.load_diffusion_model(path, model_options={} if dtype is None else {"dtype": dtype})
    detected = type(patcher.model.model_config).__name__ if patcher is not None else None
    if detected != FAMILIES[name]["cls"]:
        raise RuntimeError(f"the host detected {detected} in the benchmark's {name} file, expected {FAMILIES[name]['cls']}")
    return patcher


def conditioning(name: str, seed: int, quick: bool = False) -> list:
    """A CONDITIONING of the family's text encoders' shapes (random values; with `quick` the tiny
    model's text width), with FluxGuidance's entry for Flux dev."""
    from tests.support import tiny_families

    spec = FAMILIES[name]
    width = tiny_families.FAMILIES[spec["tiny"]]["context"] if quick else spec["context"]
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, spec["tokens"], spec["context"], generator=g)[..., :width]
    extra = {}
    if spec["pooled"] is not None:
        extra["pooled_output"] = torch.randn(1, spec["pooled"], generator=g)
    if spec["guidance"] is not None:
        extra["guidance"] = spec["guidance"]
    return [[context, extra]]


def lora_state_dict(name: str, shapes: dict, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA of the family's training targets (attention and MLP Linear layers), host key format."""
    spec = FAMILIES[name]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if len(shape) == 2 and key.endswith(".weight") and key[: -len(".weight")].endswith(spec["lora"]):
            prefix = "diffusion_model." + key[: -len(".weight")]
            out[prefix + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5).to(spec["dtype"])
            out[prefix + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.1 / rank ** 0.5).to(spec["dtype"])
            out[prefix + ".alpha"] = torch.tensor(float(rank))
    return out
