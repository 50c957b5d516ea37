"""Loading domain UNet files: a full diffusion-model state dict, or a LoRA of the base.

Only safetensors files are read (never pickles). Every failure names the file and says what
was expected.
"""
from __future__ import annotations

import logging
import os

import safetensors
import torch

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.sd

from . import paper_format
from .dynamic_vram import settle_lazy_dtypes

log = logging.getLogger(__name__)

LORA_MARKERS = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", ".lora.up.", ".lora.down.", ".hada_w1_a", ".lokr_w1", ".alpha")


# The weight dtypes of the host's Load Diffusion Model (UNETLoader), as the model_options it gives
# the host's loader: the weights stored in 8 bits (half of fp16's memory), computed in the dtype the
# host picks for the device; "_fast" also lets the host use fp8 matrix multiplies where the device has them.
WEIGHT_DTYPES: dict[str, dict] = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def weight_dtype_options(weight_dtype: str) -> dict:
    """The host loader's model_options for a weight_dtype name (WEIGHT_DTYPES)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise DomainModelError(f"weight_dtype {weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}")
    return dict(WEIGHT_DTYPES[weight_dtype])


class DomainModelError(ValueError):
    """A domain UNet file that cannot be used; the message names the file and the fix."""


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with errors that name the file."""
    name = os.path.basename(path)
    if not path.lower().endswith((".safetensors", ".sft")):
        raise DomainModelError(
            f"domain UNet '{name}' is not a .safetensors file; this pack loads safetensors only "
            "(pickled .ckpt/.pt/.bin files can run code when opened): convert it to safetensors first"
        )
    if not os.path.isfile(path):
        raise DomainModelError(f"domain UNet '{name}' does not exist at {path}")
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise DomainModelError(
            f"domain UNet '{name}' is not a readable safetensors file ({type(e).__name__}: {e}); "
            "it is corrupt or incomplete: copy or download it again"
        ) from e
    if not tensors:
        raise DomainModelError(f"domain UNet '{name}' holds no tensors")
    return tensors, metadata


def is_lora(tensors: dict[str, torch.Tensor]) -> bool:
    return any(marker in k for k in tensors for marker in LORA_MARKERS)


def describe(model) -> str:
    """A model's family and latent format, as the host names them (e.g. 'SD15 / SD15 latents')."""
    base = model.model
    return f"{type(base.model_config).__name__} / {type(base.latent_format).__name__} latents"


def _comparable_unet_config(model) -> dict:
    ignore = {"dtype", "device", "operations", "disable_unet_model_creation"}
    return {k: v for k, v in model.model.model_config.unet_config.items() if k not in ignore}


def check_compatible(domain, base, name: str = "", *, what: str | None = None) -> None:
    """Raise DomainModelError unless `domain` has the base's architecture, latent format and
    prediction type. The message names `what` (default: the file `name`), e.g. an input's name."""
    what = what or f"domain UNet '{name}'"
    if type(domain.model.model_config) is not type(base.model.model_config) or \
            type(domain.model.latent_format) is not type(base.model.latent_format):
        raise DomainModelError(
            f"{what} is {describe(domain)}, but the base model is {describe(base)}: "
            "a domain UNet must be trained from the same family as the base it guides"
        )
    a, b = _comparable_unet_config(domain), _comparable_unet_config(base)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = ", ".join(f"{k}: domain {a.get(k)!r} vs base {b.get(k)!r}" for k in diff[:4])
        raise DomainModelError(f"{what} has another UNet architecture than the base model ({detail})")
    if domain.model.model_type != base.model.model_type:
        raise DomainModelError(
            f"{what} predicts {domain.model.model_type.name}, the base model "
            f"{base.model.model_type.name}: train the domain UNet from this base"
        )


def load_full(tensors, metadata, name: str, model_options: dict | None = None):
    """A full diffusion-model state dict (any format the host's UNETLoader reads) as a MODEL."""
    model = comfy.sd.load_diffusion_model_state_dict(tensors, model_options=model_options or {}, metadata=metadata)
    if model is None:
        raise DomainModelError(
            f"domain UNet '{name}' is not a diffusion model the host recognises "
            f"({len(tensors)} tensors, e.g. '{next(iter(tensors))}'): expected a UNet state dict "
            "saved by Train Domain UNet or by the host's UNET save nodes, or a LoRA"
        )
    return model


def base_config_copy(base):
    """A fresh copy of the base's model config (class, UNet config, inference and cast dtypes,
    operations) whose prediction type is the base's, not re-detected from weights."""
    source = base.model.model_config
    config = type(source)(source.unet_config)
    config.manual_cast_dtype = source.manual_cast_dtype
    config.custom_operations = source.custom_operations
    config.optimizations = dict(source.optimizations)
    model_type = base.model.model_type
    config.model_type = lambda state_dict, prefix="": model_type
    return config


def model_from_base_config(base, tensors, name: str, model_options: dict | None = None):
    """A MODEL of a full UNet state dict of the base's architecture, built from the base's own model
    config as the host builds a loaded model (no detection: it works where the host could not
    recognise the weights on their own). model_options' dtype and fp8_optimizations (WEIGHT_DTYPES)
    store the weights in that dtype, as the host's loader does."""
    config = base_config_copy(base)
    options = model_options or {}
    if options.get("dtype") is not None:
        dtype = options["dtype"]
        config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(
            dtype, base.load_device, config.supported_inference_dtypes))
    if options.get("fp8_optimizations"):
        config.optimizations["fp8"] = True
    model = config.get_model(tensors, "").to(base.offload_device)
    missing = sorted(set(model.diffusion_model.state_dict()) - set(tensors))
    if missing:
        raise DomainModelError(f"domain UNet '{name}' lacks {len(missing)} weights of the base's UNet (e.g. '{missing[0]}')")
    model.load_model_weights(dict(tensors), "")
    settle_lazy_dtypes(model.diffusion_model)  # dynamic VRAM (0.33) keeps a file's fp32 in an fp16 layer
    return comfy.model_patcher.ModelPatcher(model, load_device=base.load_device, offload_device=base.offload_device)


def apply_lora(base, tensors, name: str, strength: float = 1.0):
    """A clone of the base MODEL with the LoRA patched in; error if its keys match nothing."""
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    domain = base.clone()
    applied = domain.add_patches(patches, strength)
    if not applied:
        example = next(iter(tensors))
        raise DomainModelError(
            f"LoRA '{name}' matches no weight of the base model ({describe(base)}; e.g. key '{example}'): "
            "it was trained for another base model"
        )
    unmatched = len(patches) - len(applied)
    if unmatched:
        log.warning("LoRA '%s': %d of %d patches match no base weight", name, unmatched, len(patches))
    return domain


def load_domain_unet(path: str, base=None, strength: float = 1.0, model_options: dict | None = None):
    """Load a domain UNet file; a LoRA needs `base`. With `base`, check compatibility.

    model_options (the host loader's: weight_dtype_options) apply to a full copy; a LoRA rides on
    the base's weights in the base's dtype, so a weight dtype is ignored for it, with a note in the log."""
    name = os.path.basename(path)
    tensors, metadata = read_safetensors(path)
    if is_lora(tensors):
        if base is None:
            raise DomainModelError(f"'{name}' is a LoRA: connect the base MODEL it was trained on to base_model")
        if (model_options or {}).get("dtype") is not None:
            log.info("'%s' is a LoRA: weight_dtype %s does not apply (a LoRA domain runs on the base's weights, "
                     "in the base's dtype: set that on the base's loader)", name, model_options["dtype"])
        return apply_lora(base, tensors, name, strength)
    if paper_format.is_paper_format(tensors):  # the authors' null-text UNet (paper_format.py)
        if base is None:
            raise DomainModelError(f"'{name}' is a null-text domain UNet of the paper's code (diffusers layout, no "
                                   "cross-attention): connect the base MODEL it was trained from to base_model")
        try:
            return model_from_base_config(base, paper_format.to_host_unet(tensors, base, name), name, model_options)
        except ValueError as e:
            raise DomainModelError(str(e)) from e
    domain = load_full(tensors, metadata, name, model_options)
    if base is not None:
        check_compatible(domain, base, name)
    return domain
