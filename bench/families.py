"""Full-size diffusion transformers of today's families for the GPU benchmarks (issues 17, 32), random weights.

SD3.5 medium (MMDiT-X, 2.5B), Flux.1 dev (12B), Z-Image (6B), Flux.2 dev (32B, fp8 weights), Qwen-Image
(20B, fp8 weights) and Wan 2.2 TI2V 5B (video), each built with the host's own
classes from the config the host's model detection reads from the released checkpoints
(comfy/model_detection.py), so that a file of these weights is detected as the family it is when
the host loads it (comfy.sd.load_diffusion_model, as UNETLoader does). Weights are random (normal,
scaled by fan-in): speed and memory do not depend on their values. Conditioning has the shapes the
family's text encoders give: T5-XXL / CLIP (SD3.5, Flux), Qwen3-4B (Z-Image), Mistral-Small's three
layers (Flux.2), Qwen2.5-VL (Qwen-Image), umT5 (Wan). The fp8 families are written and loaded as their
released fp8 files are (matrices in fp8, the rest in bf16; the host computes in bf16): a bf16 Flux.2
dev file alone would take 64 GB, and two copies would not fit an 80 GB GPU.

Used by bench/sampling.py (--models sd35m,flux_dev,zimage,flux2_dev,qwen_image,wan22_5b) and
bench/training.py (--families ...).
"""
from __future__ import annotations

import torch

# name: host supported_models class, the model config (as detection spells it), weight dtype, latent channels,
# context tokens x width, pooled width (None: none), cfg users run (Flux dev and Z-Image Turbo: 1, guidance-distilled),
# Flux guidance (None: no guidance entry), LoRA target suffixes (the training row's; nodes/training/families.py),
# tiny: the tests' tiny model of the family (tests/support/tiny_families.py), for --quick; weights: the file's
# (and loaded) dtype of the matrices where not dtype; scale: the latent's downscale (8 unless given); size:
# (width, height, frames) of a video family's run (else square, 1024 px); vae: the host VAE training encodes
# with (tests/support/tiny_newer_families.host_vae's kind; else a random TAESD of the latent channels).
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
    # Flux.2 dev (32B): the host's detection config (comfy/model_detection.py) with the released file's widths
    "flux2_dev": dict(cls="Flux2", tiny="flux2", dtype=torch.bfloat16, weights=torch.float8_e4m3fn, latent=128, scale=16,
                      tokens=512, context=15360, pooled=None, cfg=1.0, guidance=4.0, vae="flux2",
                      config=dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                                  context_in_dim=15360, hidden_size=6144, mlp_ratio=3.0, num_heads=48, depth=8,
                                  depth_single_blocks=48, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                                  qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
                                  mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                                  yak_mlp=False, txt_norm=False),
                      lora=("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                            "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")),
    # Qwen-Image (20B): 60 MMDiT blocks, the model class's defaults for the rest (as the host detects it)
    "qwen_image": dict(cls="QwenImage", tiny="qwen_image", dtype=torch.bfloat16, weights=torch.float8_e4m3fn, latent=16,
                       tokens=256, context=3584, pooled=None, cfg=2.5, guidance=None, vae="wan2.1",
                       config=dict(image_model="qwen_image", in_channels=64, num_layers=60),
                       lora=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                             "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                             "txt_mlp.net.0.proj", "txt_mlp.net.2")),
    # Wan 2.2 TI2V 5B: 48 latent channels at 16x in space, 4x in time; 832 x 480, 49 frames
    "wan22_5b": dict(cls="WAN22_T2V", tiny="wan22_5b", dtype=torch.bfloat16, latent=48, scale=16, size=(832, 480, 49),
                     tokens=512, context=4096, pooled=None, cfg=5.0, guidance=None,
                     config=dict(image_model="wan2.1", model_type="t2v", dim=3072, ffn_dim=14336, num_heads=24,
                                 num_layers=30, in_dim=48, out_dim=48, patch_size=(1, 2, 2), freq_dim=256,
                                 window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6),
                     lora=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")),
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
                sd[k] = t.to(spec.get("weights", spec["dtype"]) if v.ndim > 1 else spec["dtype"])
            else:
                sd[k] = v.clone()
    del module
    return sd


def tiny_config(name: str) -> dict:
    """The model config of the tests' tiny model of the family (--quick)."""
    from tests.support import tiny_families

    return tiny_families.SPECS[FAMILIES[name]["tiny"]]["unet"]


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
    width = tiny_families.SPECS[spec["tiny"]]["context"] if quick else spec["context"]
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, spec["tokens"], spec["context"], generator=g)[..., :width]
    # (a family without a pooled output gets None, as CLIPTextEncode passes on its encoder's: Flux.2 reads it)
    extra = {"pooled_output": None if spec["pooled"] is None else torch.randn(1, spec["pooled"], generator=g)}
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


def latent_shape(name: str, batch: int, quick: bool = False) -> tuple[int, ...]:
    """The empty latent of one run of the family: [B, C, h, w] at 1024 px (64 with `quick`), or for a
    video family [B, C, T, h, w] of its size (64 px, 5 frames with `quick`)."""
    spec = FAMILIES[name]
    scale = spec.get("scale", 8)
    if "size" in spec:
        width, height, frames = (64, 64, 5) if quick else spec["size"]
        return (batch, spec["latent"], (frames - 1) // 4 + 1, height // scale, width // scale)
    px = 64 if quick else 1024
    return (batch, spec["latent"], px // scale, px // scale)


def vae(name: str):
    """A VAE with the family's latent shape for training's encode (random weights): the host's own VAE
    class where the family has `vae`, else a TAESD of its latent channels (8x)."""
    import comfy.sd
    from comfy.taesd.taesd import TAESD

    from tests.support.tiny_newer_families import host_vae
    from tests.support.tiny_nodes import plain_weights, randomize_

    spec = FAMILIES[name]
    if spec.get("vae"):
        return host_vae(spec["vae"])
    with plain_weights():
        taesd = randomize_(TAESD(latent_channels=spec["latent"]), seed=5, scale=1.0)
    return comfy.sd.VAE(sd={k: v.contiguous() for k, v in taesd.state_dict().items()})
