"""The families users run now (issue 32): Flux.2 dev, Qwen-Image (and Qwen-Image Edit), Chroma, HunyuanImage
2.1 and Wan 2.2 (the TI2V 5B, and the A14B's two experts), as specs for tiny_families.py's builder.

Each spec is the host's supported_models class with the UNet/DiT config its model detection gives a real
checkpoint (comfy/model_detection.py), kept where the class and its BaseModel read it at run time (latent
channels, patch size, text-embedding width, guidance embedding, reference-latent method, rope axes that add up
to the head width), with one or two blocks and a hidden size of 64, so a step takes milliseconds on the CPU.
Both hosts (ComfyUI 0.8.0 and 0.33) build these classes from the same configs.

- Wan 2.2 A14B: the host detects both experts (wan2.2_t2v_high_noise_14B / _low_noise_14B) as WAN21_T2V
  (16 latent channels, Wan 2.1 VAE; WAN22_T2V is the 5B TI2V with its own 48-channel VAE), so the experts
  are WAN21_T2V models, one random model per seed.
- HunyuanImage 2.1: the base model (no guidance embedding, no meanflow), with its ByT5 glyph branch.

Latents come from the host's own empty-latent node of each family (LATENTS). FamilyVAE stands in for the
VAE where the host's nodes encode an image (VAEEncode before ReferenceLatent, TextEncodeQwenImageEdit,
Wan22ImageToVideoLatent's start image): the real VAEs are hundreds of MB. TestHostVAE is the host's own VAE
class of Qwen-Image and Wan 2.2 A14B (Wan 2.1's, at a tiny width) or of Flux.2, for the templates, which
decode (tests/test_host_workflows.py).
"""
from __future__ import annotations

import torch

_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), dim=64, ffn_dim=128, freq_dim=256,
            text_dim=4096, num_heads=2, num_layers=1, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True,
            eps=1e-6)

# family -> cls: the host's supported_models class; model_type: forced (None: the class's own); context: the
# text-embedding width; pooled: the pooled output's width (None: none read); glyphs: a prompt that quotes text
# gets ByT5 glyph features (conditioning_byt5small, 1472-d), as the family's encoder gives them; unet: the model config.
NEWER = {
    # Flux.2 dev: patch 1 on 128 latent channels, global modulation, the guidance embedding, Mistral-Small's
    # 15360-d text features (three layers of 5120), reference images as extra tokens at index 10, 20, ...
    "flux2": dict(cls="Flux2", model_type=None, context=15360, pooled=None, unet=dict(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=15360, hidden_size=64,
        mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True,
        ops_bias=False, default_ref_method="index", ref_index_scale=10.0, yak_mlp=False, txt_norm=False)),
    # Qwen-Image (and Qwen-Image Edit, the same class): 16 latent channels (Wan 2.1's VAE, 5-D latents),
    # Qwen2.5-VL's 3584-d text features; Edit reads reference_latents as extra tokens ("index" method).
    "qwen_image": dict(cls="QwenImage", model_type=None, context=3584, pooled=None, unet=dict(
        image_model="qwen_image", in_channels=64, out_channels=16, patch_size=2, num_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=3584, axes_dims_rope=(8, 12, 12))),
    # Chroma: Flux.1's blocks without per-block modulation, an approximator (distilled_guidance_layer) that makes
    # every modulation from the timestep and a guidance value the checkpoint does not embed (0 unless set).
    "chroma": dict(cls="Chroma", model_type=None, context=4096, pooled=None, unet=dict(
        image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=64, mlp_ratio=4.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
        in_dim=64, out_dim=64, hidden_dim=128, n_layers=1, txt_ids_dims=[], vec_in_dim=None)),
    # HunyuanImage 2.1: the HunyuanVideo DiT on 2-D latents (64 channels at 32x), patch 1x1, Qwen2.5-VL's
    # 3584-d text features through the token refiner, the ByT5 glyph mapper (used when a prompt quotes text).
    "hunyuan_image": dict(cls="HunyuanImage21", model_type=None, context=3584, pooled=None, glyphs=True, unet=dict(
        image_model="hunyuan_video", in_channels=64, out_channels=64, patch_size=[1, 1], vec_in_dim=None,
        axes_dim=[16, 16], meanflow=False, context_in_dim=3584, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1,
        depth_single_blocks=1, theta=256, qkv_bias=True, byt5=True, guidance_embed=False,
        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)),
    # Wan 2.2 TI2V 5B: 48 latent channels (Wan 2.2's VAE, 16x), 5-D video latents, umT5's 4096-d features;
    # per-frame timesteps from the start image's noise mask (WAN22.process_timestep).
    "wan22_5b": dict(cls="WAN22_T2V", model_type=None, context=4096, pooled=None,
                     unet={**_WAN, "in_dim": 48, "out_dim": 48}),
    # Wan 2.2 A14B's experts (high noise, low noise): WAN21_T2V as the host detects them.
    "wan22_a14b": dict(cls="WAN21_T2V", model_type=None, context=4096, pooled=None,
                       unet={**_WAN, "in_dim": 16, "out_dim": 16}),
}

# family -> (the host's empty-latent node, its inputs besides batch_size): 64 x 64 pixels (128 for
# HunyuanImage's 32x VAE), 5 frames for video.
LATENTS = {
    "sd2_v": ("EmptyLatentImage", {"width": 64, "height": 64}),
    "sdxl": ("EmptyLatentImage", {"width": 64, "height": 64}),
    "flux2": ("EmptyFlux2LatentImage", {"width": 64, "height": 64}),
    "hunyuan_image": ("EmptyHunyuanImageLatent", {"width": 128, "height": 128}),
    "wan22_5b": ("Wan22ImageToVideoLatent", {"width": 64, "height": 64, "length": 5, "vae": ["vae", 0]}),
    "wan22_a14b": ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 5}),
}
SD3_LATENT = ("EmptySD3LatentImage", {"width": 64, "height": 64})  # 16 channels: SD3, Flux.1, Z-Image, Qwen, Chroma
# the sampled latent's channels and dimensions (the host's fix_empty_latent_channels makes Qwen's 4-D latent 5-D)
LATENT_SHAPES = {"sd2_v": (4, 4), "sdxl": (4, 4), "sd3": (16, 4), "flux_dev": (16, 4), "flux_schnell": (16, 4),
                 "zimage": (16, 4), "flux2": (128, 4), "qwen_image": (16, 5), "chroma": (16, 4),
                 "hunyuan_image": (64, 4), "wan22_5b": (48, 5), "wan22_a14b": (16, 5)}
# family -> (latent channels, VAE downscale, 5-D) of FamilyVAE's encoding
VAES = {"flux2": (128, 16, False), "qwen_image": (16, 128, True), "wan22_5b": (48, 16, True)}


def latent_nodes(family: str, batch: int = 1) -> dict:
    """The graph nodes of the family's empty latent ("latent"; a FamilyVAE "vae" where the node takes one)."""
    node, inputs = LATENTS.get(family, SD3_LATENT)
    out = {"latent": {"class_type": node, "inputs": {**inputs, "batch_size": batch}}}
    if "vae" in inputs:
        out["vae"] = {"class_type": "TestFamilyVAE", "inputs": {"family": family}}
    return out


class FamilyVAE:
    """The part of the host's VAE that its image-encoding nodes use (encode): a seeded latent of the
    family's channels per image (the seed from the pixels), H/d x W/d, one frame for the video latent
    families. Qwen-Image Edit's d is 128, not the VAE's 8: TextEncodeQwenImageEdit scales the image to a
    megapixel first, and 8 x 8 reference latents keep the tiny model's sequence short."""

    def __init__(self, family: str):
        self.channels, self.downscale, self.frames = VAES[family]

    def encode(self, pixels):
        b, h, w = pixels.shape[:3]
        g = torch.Generator().manual_seed(int(pixels.double().sum().item() * 1000) % (2 ** 31))
        shape = [b, self.channels] + ([1] if self.frames else []) + [h // self.downscale, w // self.downscale]
        return torch.randn(shape, generator=g)


class TestTinyWan21VAE:
    """The host's Wan 2.1 VAE (Qwen-Image's: 16 channels, video-shaped latents [B, C, T, h, w], 8x) at
    width 8 instead of 96, random weights, built by the host's loader from its state dict as from a
    file: what training encodes a Qwen-Image domain with (FamilyVAE has only the encode of a VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return (host_vae("wan2.1", width=8),)


class TestFamilyVAE:
    """Stands in for a family's VAE loader (see FamilyVAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(VAES),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        return (FamilyVAE(family),)


class TestHostVAE:
    """Stands in for a newer family's VAE loader with the host's own VAE class, random weights, built from a
    state dict as the host's loader builds one from a file:
    - "wan2.1" (wan_2.1_vae, qwen_image_vae: one architecture): comfy.ldm.wan.vae.WanVAE, 16 latent channels,
      8x in space and 4x in time, 5-D latents (one frame for an image), at width 1 (the host reads the width
      from the weights). Encoding a megapixel (TextEncodeQwenImageEdit's reference) still takes seconds on a CPU.
    - "flux2" (flux2-vae): the Flux.1 autoencoder with Flux.2's 2x2 patch and latent batch norm, 128 latent
      channels at 16x; full width (the host fixes it): 84M parameters, seconds to build on a CPU."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["wan2.1", "flux2"],)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, kind):
        return (host_vae(kind),)


def host_vae(kind: str, seed: int = 5, width: int = 1):
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.wan.vae import WanVAE

    from tests.support.tiny_nodes import plain_weights, randomize_

    with plain_weights():
        if kind == "wan2.1":  # the host's layout (num_res_blocks 2, dim_mult [1, 2, 4, 4]) at `width` (the host's: 96)
            module = WanVAE(dim=width, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True])
        else:  # the host's Flux.2 configuration (comfy/sd.py: a Flux.1 VAE file with bn.running_mean)
            module = AutoencoderKL(embed_dim=32, ddconfig={
                "double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True})
        randomize_(module, seed=seed, scale=1.0)
    return comfy.sd.VAE(sd={k: v.contiguous() for k, v in module.state_dict().items()})
