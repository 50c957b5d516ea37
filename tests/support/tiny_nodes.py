"""Tiny SD1-architecture models with random weights, test-only nodes that hand them to graphs,
and a tiny captionless image domain (domain_images).

The UNet keeps SD1.5's identifying dimensions (320 model channels, 768-d context) so that the
host's own model detection recognises it as SD15, but has one level and one block per stage.
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None,
    use_spatial_transformer=True, legacy=False, use_temporal_resblock=False, use_temporal_attention=False,
)
# SD2-family variant (another text encoder width and linear projections): the "wrong family" model.
SD2_UNET_CONFIG = {**UNET_CONFIG, "context_dim": 1024, "use_linear_in_transformer": True, "num_head_channels": 64}
CLIP_CONFIG = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 768,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 1, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
# SD1's VAE layout (8x, 4 latent channels) at width 32 instead of 128: a 64 x 64 decode in ~1/16 of the time.
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 32,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


@contextlib.contextmanager
def plain_weights():
    """Host modules built by a test inside the block get ordinary weights (under the host's dynamic
    VRAM, 0.33+ on NVIDIA, its ops leave a new layer's weights unset until a loader fills them)."""
    try:
        import comfy.memory_management as mem
    except ImportError:  # hosts before dynamic VRAM
        yield
        return
    before = mem.aimdo_enabled
    mem.aimdo_enabled = False
    try:
        yield
    finally:
        mem.aimdo_enabled = before


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """Fill every parameter with seeded noise (~unit activations); no zero-initialised outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (scale / fan_in ** 0.5 if p.ndim > 1 else 0.1))
    return module


@functools.lru_cache(maxsize=None)
def unet_state_dict(seed: int = 0, config_name: str = "sd1") -> dict[str, torch.Tensor]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = UNET_CONFIG if config_name == "sd1" else SD2_UNET_CONFIG
    with plain_weights():
        model = randomize_(UNetModel(**config, dtype=torch.float32, device="cpu"), seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def domain_state_dict(base_seed: int = 0, delta_seed: int = 1, amount: float = 0.3) -> dict[str, torch.Tensor]:
    """A 'trained' domain UNet: the base weights plus a seeded perturbation."""
    g = torch.Generator().manual_seed(delta_seed)
    return {k: (v + amount * v.std(correction=0).nan_to_num() * torch.randn(v.shape, generator=g)).contiguous()
            for k, v in unet_state_dict(base_seed).items()}


def load_unet(sd):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd))


def lora_state_dict(seed: int = 2, rank: int = 4, scale: float = 2.0) -> dict[str, torch.Tensor]:
    """A LoRA of the tiny UNet's attention projections in the host's key format."""
    g = torch.Generator().manual_seed(seed)
    sd = unet_state_dict(0)
    out = {}
    for key, w in sd.items():
        if key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")) and w.ndim == 2:
            prefix = "diffusion_model." + key[: -len(".weight")]
            out[prefix + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
            out[prefix + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale / w.shape[1] ** 0.5
            out[prefix + ".alpha"] = torch.tensor(float(rank))
    return out


def merge_lora(sd: dict, lora: dict, strength: float = 1.0) -> dict:
    """The full weights equivalent to applying `lora` (for checking the per-row adapter)."""
    out = dict(sd)
    for key in lora:
        if key.endswith(".lora_down.weight"):
            prefix = key[: -len(".lora_down.weight")]
            down, up = lora[key], lora[prefix + ".lora_up.weight"]
            alpha = float(lora[prefix + ".alpha"]) / down.shape[0]
            target = prefix[len("diffusion_model."):] + ".weight"
            out[target] = (out[target] + strength * alpha * (up @ down)).contiguous()
    return out


def controlnet_state_dict(seed: int = 3) -> dict[str, torch.Tensor]:
    from comfy.cldm.cldm import ControlNet

    cfg = {k: v for k, v in UNET_CONFIG.items() if k not in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
    with plain_weights():
        model = randomize_(ControlNet(hint_channels=3, **cfg, dtype=torch.float32, device="cpu"), seed, scale=0.5)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def tiny_clip():
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             textmodel_json_config=CLIP_CONFIG, return_projected_pooled=False)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": TinyClipL}
    with plain_weights():
        clip = comfy.sd.CLIP(target=target)
    randomize_(clip.cond_stage_model, seed=10, scale=1.0)
    return clip


@functools.lru_cache(maxsize=None)
def tiny_vae():
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    params = {"ddconfig": VAE_DDCONFIG, "embed_dim": 4}
    with plain_weights():
        module = randomize_(AutoencoderKL(**params), seed=11, scale=1.0)
    # (the host's VAE reads SD1's width from no weight: its config, as for a file with a config, gives it)
    return comfy.sd.VAE(sd={k: v.contiguous() for k, v in module.state_dict().items()}, config={"params": params})


# How the host keeps the UNet's weights: its own choice for the device ("host default": float32
# on the CPU, fp16 on an H200), or as on a GPU even on the CPU: half-precision weights and no
# manual cast (the host calls the UNet with its activations cast to the weights' dtype, and
# autograd or a float32 copy meet them as they are).
UNET_DTYPES = {"host default": None, "fp16 without cast": torch.float16, "bf16 without cast": torch.bfloat16}


def tiny_model(unet_dtype: str = "host default"):
    """The tiny SD1 MODEL, one per weight dtype for the whole session (as a loaded checkpoint is)."""
    return _tiny_model(unet_dtype)


@functools.lru_cache(maxsize=None)
def _tiny_model(unet_dtype: str):
    """Loaded from a file in the host's diffusion_models folder as UNETLoader loads it (the host can
    then load it again, e.g. without dynamic VRAM for training or weight hooks)."""
    import comfy.model_management
    import comfy.sd
    import folder_paths
    from unittest import mock

    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], "tiny_base.safetensors")
    if not os.path.exists(path):  # written once: a loaded model may read it (mmap) for its whole life
        write_safetensors(path, unet_state_dict(0))
    dtype = UNET_DTYPES[unet_dtype]
    if dtype is None:
        return comfy.sd.load_diffusion_model(path)
    with mock.patch.object(comfy.model_management, "unet_manual_cast", lambda *args, **kwargs: None):
        return comfy.sd.load_diffusion_model(path, model_options={"dtype": dtype})


def checkpoint_state_dict(dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A checkpoint file that the host's Load Checkpoint reads as SD1.5: the tiny UNet, a full-size
    CLIP-L text encoder (the host builds SD1's text encoder at its real size) and a tiny TAESD VAE,
    all random. Stored in float16 (about 300 MB)."""
    import comfy.sd1_clip
    from comfy.taesd.taesd import TAESD

    with plain_weights():
        clip = randomize_(comfy.sd1_clip.SDClipModel(), seed=10, scale=1.0)
        vae = randomize_(TAESD(latent_channels=4), seed=11, scale=1.0)
    parts = {"model.diffusion_model.": unet_state_dict(0), "cond_stage_model.": clip.state_dict(),
             "first_stage_model.": vae.state_dict()}
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
            for prefix, sd in parts.items() for k, v in sd.items()}


class TestTinyCheckpoint:
    """Stands in for CheckpointLoaderSimple in tests: the tiny SD1 MODEL, CLIP and VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": "tiny"})},
                "optional": {"unet_dtype": (list(UNET_DTYPES), {"default": "host default"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name, unet_dtype="host default"):
        return tiny_model(unet_dtype), tiny_clip(), tiny_vae()


def make_capture(host):
    class TestCapture:
        """Output node that hands its input to the test."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("*",), "label": ("STRING", {"default": "out"})}}

        @classmethod
        def VALIDATE_INPUTS(cls, input_types):
            return True

        RETURN_TYPES = ()
        FUNCTION = "capture"
        OUTPUT_NODE = True
        CATEGORY = "testing"

        def capture(self, value, label):
            host.captured[label] = value
            return {}

    return TestCapture


class TestTinyTAESD:
    """A tiny-autoencoder VAE (the host's TAESD) with the given latent channels: 16 stands for a VAE
    of another family (SD3/Flux) than the SD1 test model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent_channels": ("INT", {"default": 16})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, latent_channels):
        import comfy.sd
        from comfy.taesd.taesd import TAESD

        with plain_weights():
            module = randomize_(TAESD(latent_channels=latent_channels), seed=5, scale=1.0)
        # (the channel count as the host's loader passes it for a TAESD file: newer hosts build Flux.2's
        # 128-channel TAESD on 32 channels and a 2x2 patch, and read 32 from its weights otherwise)
        return (comfy.sd.VAE(sd={k: v.contiguous() for k, v in module.state_dict().items()},
                             metadata={"tae_latent_channels": latent_channels}),)


class TestConditioning:
    """A CONDITIONING of the given text-embedding width ([1, 77, width], zeros): stands in for a
    prompt encoded by a CLIP of another model family."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 96, "min": 1, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, width):
        return ([[torch.zeros(1, 77, width), {}]],)


class TestHookedConditioning:
    """A CONDITIONING with an empty HookGroup on each entry: hooks that change nothing, which still
    make the host treat the prompt as hooked (under dynamic VRAM: its non-dynamic copy of the base)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "hook"
    CATEGORY = "testing"

    def hook(self, conditioning):
        import comfy.hooks

        return ([[t, {**d, "hooks": comfy.hooks.HookGroup()}] for t, d in conditioning],)


def register(host):
    import nodes

    nodes.NODE_CLASS_MAPPINGS["TestHookedConditioning"] = TestHookedConditioning
    nodes.NODE_CLASS_MAPPINGS["TestTinyCheckpoint"] = TestTinyCheckpoint
    nodes.NODE_CLASS_MAPPINGS["TestConditioning"] = TestConditioning
    nodes.NODE_CLASS_MAPPINGS["TestTinyTAESD"] = TestTinyTAESD
    nodes.NODE_CLASS_MAPPINGS["TestCapture"] = make_capture(host)


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def domain_images(folder, sizes=((64, 64), (64, 96), (96, 64), (64, 64), (80, 80), (64, 128))):
    """A small captionless 'domain': soft colour blobs on a warm background, in mixed sizes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        cy, cx = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)[..., None]
        pixels = (np.array([230, 180, 120]) * (1 - blob) + np.array([40, 60, 160]) * blob).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img_{i}.png"))
    return folder
