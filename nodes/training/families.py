"""The model families Train Domain UNet trains: one row per family of the host's diffusion models.

Each row says which layers take LoRA adapters (the attention and feed-forward projections, as the
family's usual LoRA trainers choose them), which blocks gradient checkpointing recomputes, which
of the host's conditioning inputs (model_base.extra_conds) the diffusion model takes, under which
keyword, and the cfg its users sample it at (the validation samples' default). How a family is
noised and what it predicts comes from the host's model_sampling (read with the rest in
inputs.read_host_model), not from this table.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...lora_hooks import DEFAULT_TARGETS


def _numbered(module: torch.nn.Module, *lists: str) -> tuple[str, ...]:
    """'name.0', 'name.1', ... for each ModuleList attribute named in `lists`."""
    return tuple(f"{name}.{i}" for name in lists for i in range(len(getattr(module, name, ()))))


def unet_blocks(unet: torch.nn.Module) -> tuple[str, ...]:
    """The UNet layers whose activations are recomputed in backward: every layer (ResBlock,
    SpatialTransformer, up/downsampling) of every input, middle and output block. The layers, not
    the blocks: the host's UNet calls a block's layers one by one (forward_timestep_embed)."""
    names = []
    for name, child in unet.named_children():
        if name in ("input_blocks", "output_blocks"):
            names += [f"{name}.{i}.{j}" for i, block in enumerate(child) for j in range(len(block))]
        elif name == "middle_block":
            names += [f"{name}.{j}" for j in range(len(child))]
    return tuple(names)


@dataclass(frozen=True)
class Family:
    name: str  # as the README and errors name it
    module: str  # the host's class of the diffusion model, "package.module:Class"
    lora_targets: tuple[str, ...]  # module-path suffixes (fnmatch) of the Linear/Conv2d layers adapted
    blocks: Callable[[torch.nn.Module], tuple[str, ...]]  # what gradient checkpointing recomputes
    conds: dict[str, str]  # host extra_conds key -> the diffusion model's keyword argument
    adds_in_place: bool = False  # its blocks update tensors autograd saved (differentiable._OutOfPlaceAdds)
    # the host's model config's "image_model" this row is for, where the host builds several families
    # on one class (Flux.1 and Flux.2 both on comfy.ldm.flux.model.Flux); None: any
    image_model: str | None = None
    # further entries of the model config's unet_config this row is for, where image_model is shared too
    # (HunyuanImage 2.1 and HunyuanVideo: "hunyuan_video"); None: the entry absent
    unet_config: dict = field(default_factory=dict)
    # the cfg the family is usually sampled at (its templates'; 1 for a guidance-distilled model, whose
    # guidance embedding steers and whose negative is then not computed): the validation samples' default
    cfg: float = 7.0


# Flux's double- and single-stream blocks (comfy.ldm.flux.layers), which Flux.1, Flux.2 and Chroma share
_FLUX_TARGETS = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                 "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")


def _flux_blocks(m: torch.nn.Module) -> tuple[str, ...]:
    return _numbered(m, "double_blocks", "single_blocks")


# Qwen-Image's MMDiT blocks (comfy.ldm.qwen_image.model): the attention projections of the image stream
# (to_q/k/v, to_out.0) and the text stream (add_q/k/v_proj, to_add_out) and both GELU MLPs, the layers
# musubi-tuner and ai-toolkit adapt (every Linear of a block but its img_mod/txt_mod modulation)
_QWEN_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                 "txt_mlp.net.2")


FAMILIES = (
    Family("UNet (SD1.x, SD2.x, SDXL)", "comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel",
           DEFAULT_TARGETS, unet_blocks, {"c_crossattn": "context", "y": "y"}),
    Family("MMDiT (SD3, SD3.5)", "comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper",
           ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"), lambda m: _numbered(m, "joint_blocks"),
           {"c_crossattn": "context", "y": "y"}, cfg=4.5),
    Family("Flux.1 (dev, schnell)", "comfy.ldm.flux.model:Flux", _FLUX_TARGETS, _flux_blocks,
           {"c_crossattn": "context", "y": "y", "guidance": "guidance"}, adds_in_place=True, image_model="flux", cfg=1.0),
    # Flux.2 dev: the host's Flux class again (SiLU-gated MLPs without bias, modulation shared across
    # blocks: none of them adapted), its layers named as Flux.1's; no pooled input
    Family("Flux.2 (dev)", "comfy.ldm.flux.model:Flux", _FLUX_TARGETS, _flux_blocks,
           {"c_crossattn": "context", "guidance": "guidance"}, adds_in_place=True, image_model="flux2", cfg=1.0),
    # Chroma: Flux's blocks (their modulation from a shared approximator: not adapted), no pooled input,
    # guidance an input the host sets to 0; Chroma Radiance (pixel space, the same class) is not this row
    Family("Chroma", "comfy.ldm.chroma.model:Chroma", _FLUX_TARGETS, _flux_blocks,
           {"c_crossattn": "context", "guidance": "guidance"}, adds_in_place=True, image_model="chroma", cfg=4.0),
    # (cfg 1: Z-Image Turbo, distilled, the one the host's templates sample). The host builds other models
    # on NextDiT too (0.33: Z-Image's pixel-space model, image_model "zimage_pixel", which has no VAE
    # latents to train on; newer hosts: Ming-Image's frame latents): this row is the "lumina2" config only
    Family("Z-Image (Lumina 2 DiT)", "comfy.ldm.lumina.model:NextDiT",
           ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
           lambda m: _numbered(m, "noise_refiner", "context_refiner", "layers"),
           {"c_crossattn": "context", "num_tokens": "num_tokens", "attention_mask": "attention_mask"},
           image_model="lumina2", cfg=1.0),
    # Qwen-Image and Qwen-Image Edit (one class and config): trained on the empty prompt alone, so no
    # reference latents (an Edit model's reference belongs to the prompt's rows, at sampling); the
    # encoder's attention_mask where it gives one (0.33's extra_conds passes it on). Its latents are
    # video-shaped (Wan 2.1's VAE): each image is one frame (inputs.one_frame).
    Family("Qwen-Image (and Edit)", "comfy.ldm.qwen_image.model:QwenImageTransformer2DModel", _QWEN_TARGETS,
           lambda m: _numbered(m, "transformer_blocks"), {"c_crossattn": "context", "attention_mask": "attention_mask"},
           # Qwen-Image Layered (use_additional_t_cond: an RGBA layer stack per image, in the same config) is not this row
           image_model="qwen_image", unet_config={"use_additional_t_cond": None}, cfg=4.0),
    # HunyuanImage 2.1: the host's HunyuanVideo class on 2-D patches with Flux's double/single blocks (their
    # modulation not adapted, as musubi-tuner's HunyuanVideo LoRA leaves it; nor the token refiner or the
    # glyph mapper). HunyuanVideo, its 1.5 and the 2.1 refiner share class and image_model on 3-D patches;
    # the distilled checkpoint (meanflow) also embeds the sampler's next sigma, which a training step has
    # not. Inputs: context, the encoder's mask where it masks, guidance (the host's 6.0, which the base does
    # not embed); no ByT5 glyph features: they come from quoted text, and the empty prompt quotes none.
    Family("HunyuanImage 2.1 (not distilled)", "comfy.ldm.hunyuan_video.model:HunyuanVideo", _FLUX_TARGETS,
           _flux_blocks, {"c_crossattn": "context", "attention_mask": "attention_mask", "guidance": "guidance"},
           adds_in_place=True, image_model="hunyuan_video", unet_config={"patch_size": [1, 1], "meanflow": False},
           cfg=3.5),
)


def _host_class(path: str):
    module, name = path.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # a host without this family
        return None


def family_of(model) -> Family:
    """The row of the MODEL's diffusion model, told by its class and, where the host builds several
    families on one class, by its model config's "image_model" (and the row's other unet_config
    entries); ValueError naming it and the supported families."""
    dm = model.model.diffusion_model
    config = getattr(model.model.model_config, "unet_config", None) or {}
    for family in FAMILIES:
        cls = _host_class(family.module)
        if cls is not None and isinstance(dm, cls) and family.image_model in (None, config.get("image_model")) \
                and all(config.get(k) == v for k, v in family.unet_config.items()):
            return family
    raise ValueError(
        f"model: training supports {', '.join(f.name for f in FAMILIES)}; this model "
        f"({type(model.model.model_config).__name__}, a {type(dm).__name__}) is none of them")
