"""Tiny random-weight models of today's model families, built from config with the host's own classes.

Each family is the host's supported_models class (SD20 with v prediction, SDXL, SD3, Flux, FluxSchnell,
ZImage here; Flux2, QwenImage, Chroma, HunyuanImage21, WAN22_T2V, WAN21_T2V in tiny_newer_families.py),
instantiated with a UNet/DiT config that keeps what the class and its BaseModel read at run
time (latent channels, text-embedding width, pooled-output width, SDXL's size-conditioning ADM width,
guidance embedding, rope axes that add up to the head width) but has one or two blocks and a small
hidden size, so a sampling step takes milliseconds on the CPU. The model is the host's own
(model_base.SDXL, SD3, Flux, Lumina2 ...) with its own model_sampling (v, flow with the family's shift)
and extra_conds; nothing is downloaded.

The host's model detection cannot recognise models this small for most of these families (it
identifies SDXL by its full block layout, Flux by its 3072-wide head layout, Z-Image by its 3840 width),
so the model is built from the class as the host's loader builds one after detection
(comfy.sd.load_diffusion_model_state_dict: config -> set_inference_dtype -> get_model -> ModelPatcher).

Conditioning is built directly (no text encoder): a seeded [1, 77, width] tensor per prompt text plus
the entries the family's extra_conds reads (pooled_output; Flux's guidance where asked for).

The test nodes (register()):
- TestFamilyModel(family, seed) -> MODEL: one object per (family, seed) for the session, as a loaded
  checkpoint is; seed 0 is the base, another seed a full-copy domain of the same family.
- TestFamilyConditioning(family, text, guidance) -> CONDITIONING (guidance < 0: no guidance entry).
- TestFormulaGuider: a GUIDER computing n + cfg (c - n) + w (d - u) row by row (the oracle).
- TestFamilyCLIP(family) -> CLIP: stands in for the family's text encoders (DualCLIPLoader, CLIPLoader, a
  checkpoint's CLIP) under the host's own CLIPTextEncode: tokenize/encode_from_tokens_scheduled give
  conditioning(family, text). (The real encoders are full width: CLIP-G, T5-XXL, Qwen3 cost seconds to build.)
- TestFamilyCheckpoint(family) -> MODEL, CLIP, VAE: stands in for Load Checkpoint of a family (SDXL): the
  family's MODEL, TestFamilyCLIP and a tiny TAESD of its latent channels.
- TestFamilyVAE(family): a stand-in VAE for the host's image-encoding nodes (tiny_newer_families.FamilyVAE).
- TestTinyWan21VAE: the host's Wan 2.1 VAE at width 8 (Qwen-Image's latents; tiny_newer_families.py).
- TestHostVAE(kind): the host's own VAE of Qwen-Image and Wan 2.2 A14B (Wan 2.1's, tiny) or of Flux.2 (tiny_newer_families.py).
Latents come from the host's own empty-latent node of each family (tiny_newer_families.latent_nodes).
"""
from __future__ import annotations

import functools
import zlib

import torch

from tests.support.host import pack_module
from tests.support.tiny_newer_families import NEWER, TestFamilyVAE, TestHostVAE, TestTinyWan21VAE
from tests.support.tiny_nodes import plain_weights, randomize_

_SD_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1], channel_mult=[1],
                transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                use_spatial_transformer=True, legacy=False, use_temporal_resblock=False, use_temporal_attention=False,
                use_linear_in_transformer=True, adm_in_channels=None)
_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=64,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000,
             patch_size=2, qkv_bias=True, txt_ids_dims=[], yak_mlp=False, txt_norm=False)

# family -> cls: the host's supported_models class; model_type: forced (None: the class's own); context: the
# text-embedding width; pooled: the pooled output's width (None: the family reads none); unet: the model config.
FAMILIES = {
    # SD2.x 768-v: SD20's 1024-d context and linear projections, v prediction (SD20.model_type reads it from
    # a weight of the full-size UNet, so it is set here, as for SD2 768-v). 64 model channels instead of 320
    # (the UNets here are built from the class, not detected; 320 costs several times the CPU time).
    "sd2_v": dict(cls="SD20", model_type="V_PREDICTION", context=1024, pooled=None,
                  unet={**_SD_UNET, "context_dim": 1024}),
    # SDXL: 2048-d context, ADM of the 1280-d pooled output plus six 256-d size embeddings (2816).
    "sdxl": dict(cls="SDXL", model_type=None, context=2048, pooled=1280,
                 unet={**_SD_UNET, "context_dim": 2048, "adm_in_channels": 2816, "num_classes": "sequential"}),
    # SD3 / SD3.5 (MMDiT, flow, shift 3): hidden 64 * depth, 4096-d context (T5 width), 2048-d pooled output.
    "sd3": dict(cls="SD3", model_type=None, context=4096, pooled=2048,
                unet=dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
                          context_embedder_config={"target": "torch.nn.Linear",
                                                   "params": {"in_features": 4096, "out_features": 128}},
                          num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None,
                          x_block_self_attn_layers=[])),
    # Flux.1 dev: guidance-distilled (a guidance embedding), 4096-d context, 768-d pooled output.
    "flux_dev": dict(cls="Flux", model_type=None, context=4096, pooled=768, unet={**_FLUX, "guidance_embed": True}),
    # Flux.1 schnell: no guidance embedding, flow with shift 1.
    "flux_schnell": dict(cls="FluxSchnell", model_type=None, context=4096, pooled=768,
                         unet={**_FLUX, "guidance_embed": False}),
    # Z-Image (the host's ZImage: Lumina2's NextDiT with Z-Image's modulation), 2560-d caption features (Qwen3-4B),
    # Z-Image's head layout (head width 128 = rope axes 32 + 48 + 48); width 256, the least Z-Image's modulation
    # takes (its 256-d timestep embedding feeds an adaLN of input width min(dim, 256)).
    "zimage": dict(cls="ZImage", model_type=None, context=2560, pooled=None,
                   unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=2560, n_layers=1,
                             n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                             axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                             z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)),
}
LATENT_CHANNELS = {"sd2_v": 4, "sdxl": 4, "sd3": 16, "flux_dev": 16, "flux_schnell": 16, "zimage": 16, "flux2": 128, "chroma": 16,
                   "hunyuan_image": 64}
# every family the test nodes build: the six above, then the families users run now (tiny_newer_families.py)
SPECS = {**FAMILIES, **NEWER}


def family_config(family: str):
    """The host's model config (supported_models class instance) of the tiny `family` model, as the
    host's loader sets it up: inference dtype and manual cast for this device."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.supported_models

    spec = SPECS[family]
    config = getattr(comfy.supported_models, spec["cls"])(spec["unet"])
    if spec["model_type"] is not None:
        model_type = getattr(comfy.model_base.ModelType, spec["model_type"])
        config.model_type = lambda state_dict, prefix="", t=model_type: t
    dtype = mm.unet_dtype(model_params=0, supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), config.supported_inference_dtypes))
    return config


def family_model(family: str, seed: int = 0, weight_dtype: str = "default"):
    """The tiny MODEL (a ModelPatcher of the host's BaseModel) of `family`, random weights from `seed`:
    one object per (family, seed, weight_dtype) for the session, as a loaded checkpoint is.
    weight_dtype "float8_e4m3fn": the same weights stored in fp8, cast per layer to float32 as the host
    does for UNETLoader's fp8 weight_dtype (its manual cast)."""
    return _family_model(family, seed, weight_dtype)


@functools.lru_cache(maxsize=None)
def _family_model(family: str, seed: int, weight_dtype: str = "default"):
    import comfy.model_management as mm
    import comfy.model_patcher

    if weight_dtype != "default":
        source = _family_model(family, seed).model
        config = family_config(family)
        config.set_inference_dtype(getattr(torch, weight_dtype), torch.float32)
        with plain_weights():
            model = config.get_model({}, "")
        model.load_model_weights({k: v.clone() for k, v in source.diffusion_model.state_dict().items()}, "")
        # stored as built: ComfyUI 0.33 under dynamic VRAM keeps a loaded tensor's own dtype (the pack's cast)
        pack_module("nodes.dynamic_vram").settle_lazy_dtypes(model.diffusion_model)
        model = model.to(mm.unet_offload_device())
        return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    with plain_weights():
        model = family_config(family).get_model({}, "")
    seed = 1000 * (list(SPECS).index(family) + 1) + seed
    randomize_(model.diffusion_model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # buffers a checkpoint holds (SD3's pos_embed), allocated uninitialised by the host
        for name in sorted(dict(model.diffusion_model.named_buffers())):
            buffer = model.diffusion_model.get_buffer(name)
            if name in model.diffusion_model.state_dict() and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.5)
    model = model.to(mm.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def conditioning(family: str, text: str, guidance: float | None = None, *, absent: bool = True) -> list:
    """A CONDITIONING for `text` (a seeded tensor of the family's context width, the same for the same
    text) with the family's pooled output (and ByT5 glyph features where the family reads them and the
    text quotes some); `guidance` set unless None."""
    spec = SPECS[family]
    g = torch.Generator().manual_seed(zlib.crc32(f"{family}:{text}".encode()))
    tensor = torch.randn(1, 77, spec["context"], generator=g)
    extra = {}
    if spec["pooled"] is not None:
        extra["pooled_output"] = torch.randn(1, spec["pooled"], generator=g)
    elif family in NEWER:  # their text encoders give none, which CLIPTextEncode passes on as None (Flux.2, Chroma read it)
        extra["pooled_output"] = None
    if spec.get("glyphs") and '"' in text:  # (HunyuanImage 2.1's encoder: ByT5 features of the quoted text)
        extra["conditioning_byt5small"] = torch.randn(1, 8, 1472, generator=g)
    if guidance is not None:
        extra["guidance"] = guidance
    return [[tensor, extra]]


def lora_state_dict(family: str, seed: int = 7, rank: int = 4, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A LoRA of the family's attention Linear weights in the host's generic key format
    ("diffusion_model.<module>.lora_down/lora_up/alpha", as comfy.lora.model_lora_keys_unet maps them)."""
    import comfy.lora

    base = family_model(family, 0).model
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in sorted(base.diffusion_model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not ("attn" in name or "attention" in name):
            continue
        prefix = "diffusion_model." + name
        assert key_map.get(prefix) == prefix + ".weight", prefix
        w = module.weight
        out[prefix + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale / w.shape[1] ** 0.5
        out[prefix + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale / rank ** 0.5
        out[prefix + ".alpha"] = torch.tensor(float(rank))
    return out


class TestFamilyModel:
    """A tiny random-weight MODEL of a model family (seed 0: the base; another seed: a full-copy domain)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(SPECS),), "seed": ("INT", {"default": 0, "min": 0, "max": 1000})},
                "optional": {"weight_dtype": (["default", "float8_e4m3fn"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed, weight_dtype="default"):
        return (family_model(family, seed, weight_dtype),)


class TestFamilyConditioning:
    """A CONDITIONING of the family's widths for `text`; guidance < 0: no guidance entry."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(SPECS),), "text": ("STRING", {"default": ""}),
                             "guidance": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, family, text, guidance):
        return (conditioning(family, text, None if guidance < 0 else guidance),)


def formula_guider_class():
    import comfy.model_management
    import comfy.samplers

    class FormulaGuider(comfy.samplers.CFGGuider):
        """The decoupled guidance written out: n + cfg (c - n) + w (d - u), every row its own host call
        (c, n, u on the base, d on the domain model), u and d on the empty prompt with `null_guidance`."""

        def __init__(self, model, domain, weight):
            super().__init__(model)
            self.domain, self.weight = domain, weight

        def inner_sample(self, *args, **kwargs):
            # The domain on the device beside the base (which the host loaded for this run): on the CPU a no-op.
            comfy.model_management.load_models_gpu([self.model_patcher, self.domain])
            self.domain.pre_run()  # (its row calls need a current patcher)
            try:
                return super().inner_sample(*args, **kwargs)
            finally:
                self.domain.cleanup()

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            def row(model, key):
                return comfy.samplers.calc_cond_batch(model, [self.conds[key]], x, timestep, model_options)[0]

            c, n, u = row(self.inner_model, "positive"), row(self.inner_model, "negative"), row(self.inner_model, "null")
            self.domain.pre_run()  # again: newer hosts may detach a model they did not load for this run
            d = row(self.domain.model, "null")  # the same family: the base's processed conditioning fits it
            return n + (c - n) * self.cfg + self.weight * (d - u)

    return FormulaGuider


class TestFormulaGuider:
    """A GUIDER computing the decoupled guidance directly (the oracle of the domain guider)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "domain_model": ("MODEL",), "positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "null_conditioning": ("CONDITIONING",),
                             "cfg": ("FLOAT", {"default": 4.0}), "weight": ("FLOAT", {"default": 1.0, "min": -10.0})}}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, model, domain_model, positive, negative, null_conditioning, cfg, weight):
        guider = formula_guider_class()(model, domain_model, weight)
        guider.inner_set_conds({"positive": positive, "negative": negative, "null": null_conditioning})
        guider.set_cfg(cfg)
        return (guider,)


class FamilyCLIP:
    """The part of the host's CLIP that CLIPTextEncode uses (tokenize, encode_from_tokens_scheduled),
    giving conditioning(family, text): the family's widths, pooled output included."""

    def __init__(self, family: str):
        self.family = family

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return text

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
        cond = conditioning(self.family, tokens)
        for _, extra in cond:
            extra.update(add_dict or {})
        return cond


class TestFamilyCLIP:
    """Stands in for a family's text-encoder loader: a CLIP whose CLIPTextEncode gives the family's conditioning."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(SPECS),)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        return (FamilyCLIP(family),)


class TestFamilyCheckpoint:
    """Stands in for Load Checkpoint of a family's checkpoint: its MODEL, CLIP and a tiny VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(FAMILIES),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family):
        from tests.support.tiny_nodes import TestTinyTAESD

        vae = TestTinyTAESD().load(LATENT_CHANNELS[family])[0]
        return family_model(family), FamilyCLIP(family), vae


def register() -> None:
    import nodes

    nodes.NODE_CLASS_MAPPINGS["TestFamilyModel"] = TestFamilyModel
    nodes.NODE_CLASS_MAPPINGS["TestFamilyConditioning"] = TestFamilyConditioning
    nodes.NODE_CLASS_MAPPINGS["TestFormulaGuider"] = TestFormulaGuider
    nodes.NODE_CLASS_MAPPINGS["TestFamilyCLIP"] = TestFamilyCLIP
    nodes.NODE_CLASS_MAPPINGS["TestFamilyCheckpoint"] = TestFamilyCheckpoint
    nodes.NODE_CLASS_MAPPINGS["TestFamilyVAE"] = TestFamilyVAE
    nodes.NODE_CLASS_MAPPINGS["TestTinyWan21VAE"] = TestTinyWan21VAE
    nodes.NODE_CLASS_MAPPINGS["TestHostVAE"] = TestHostVAE
