"""Host objects -> what training.train takes.

Everything the loop needs comes from the host. What it needs to know of the MODEL is read from it
once, at the start of a run, into a HostModel (read_host_model): its family's row (families.py),
the prediction type and noise schedule of the model_sampling the host samples it with (the base's
own, or a node's patch of it), its latent format, its conditioning inputs (the base's extra_conds:
SDXL's size embedding ...) and its dtype; run_training and its helpers are handed that object
rather than asking the model again. Besides: the VAE encode, the empty-prompt conditioning, and
the UNet module (weights with the base's LoRAs merged, loaded by the host's model management; made
usable by autograd in differentiable.py).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_sampling

from ...training import FlowSchedule
from .differentiable import load_for_training
from .families import Family, family_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class HostModel:
    """What training needs to know of the host's MODEL, read from it once (read_host_model) and handed
    to everything that needs it: the loop (schedule, conditioning, latent scaling), the family's
    defaults, the VAE check, the previews, the file's metadata and the trained MODEL. Read from the
    user's base: under dynamic VRAM the copy training runs on (differentiable.for_training) is the
    same file with the same patches, so it gives the same answers."""
    architecture: str  # the host's model config class (SD15, SDXL, Flux ...): errors and the file's metadata
    family: Family  # its row in families.py: LoRA targets, conditioning keywords, in-place adds
    prediction_type: str  # "eps", "v" or "flow" (prediction_type)
    alphas_cumprod: torch.Tensor | None  # eps and v: the discrete schedule, float64 [T]; None for flow
    flow: FlowSchedule | None  # flow: its schedule; None for eps and v
    checkpointed_blocks: tuple[str, ...]  # what gradient checkpointing recomputes: the family's blocks of this model
    latent_channels: int  # what the VAE must make
    latent_dimensions: int  # the latent format's: 2, images [B, C, h, w]; 3, video-shaped [B, C, T, h, w] (Qwen-Image)
    latent_format: str  # the latent format's class name (in the latent cache's key)
    process_latent_in: Callable[[torch.Tensor], torch.Tensor]  # VAE latents -> the model's (the latent scaling)
    extra_conds: Callable[..., dict]  # the base's model_base.extra_conds: its conditioning inputs at a size
    storage: torch.dtype  # the diffusion model's dtype: that of a full-mode file
    sampling_patch: object | None  # a node's model_sampling patch (ModelSamplingDiscrete's v, zsnr ...), else None


def read_host_model(model) -> HostModel:
    """The host's MODEL read once. A model training cannot train is refused here, before anything is
    loaded or written: by how it is sampled (prediction_type's ValueError), then by its family
    (families.family_of's)."""
    base, ms = model.model, model_sampling(model)
    kind = sampled_as(ms, type(base.model_config).__name__)
    family = family_of(model)
    return HostModel(
        architecture=type(base.model_config).__name__, family=family, prediction_type=kind,
        alphas_cumprod=None if kind == "flow" else discrete_schedule(ms),
        flow=flow_schedule(ms) if kind == "flow" else None,
        checkpointed_blocks=family.blocks(base.diffusion_model),
        latent_channels=base.latent_format.latent_channels,
        latent_dimensions=getattr(base.latent_format, "latent_dimensions", 2), latent_format=type(base.latent_format).__name__,
        process_latent_in=base.process_latent_in, extra_conds=base.extra_conds, storage=base.get_dtype(),
        sampling_patch=getattr(model, "object_patches", {}).get("model_sampling"))


def model_sampling(model):
    """The model_sampling the host samples `model` with: a node's patch of it (e.g. the host's
    ModelSamplingDiscrete: v_prediction, zsnr) if there is one, else the model's own. The
    prediction type and the schedule are both read from it, so training matches sampling."""
    get = getattr(model, "get_model_object", None)
    return get("model_sampling") if get is not None else model.model.model_sampling


def _defining_class(cls: type, attribute: str) -> type:
    """The class in cls's MRO whose own body defines `attribute` (what an instance really runs)."""
    return next((c for c in cls.__mro__ if attribute in c.__dict__), None)


def prediction_type(model) -> str:
    """The prediction type, "eps", "v" or "flow", of the MODEL: sampled_as its model_sampling."""
    return sampled_as(model_sampling(model), type(model.model.model_config).__name__)


def sampled_as(ms, architecture: str) -> str:
    """The prediction type, "eps", "v" or "flow": how the host reads the output of a model (named
    `architecture` in errors) that it samples with the model_sampling `ms`, from ms's class.

    The host composes model_sampling from a schedule and a parameterization (model_base.
    model_sampling; the ModelSamplingDiscrete node likewise). The parameterization is the class
    whose calculate_denoised runs: EPS (x0 = x - sigma eps), V_PREDICTION (v, Salimans & Ho) or
    CONST (rectified flow: x0 = x - sigma v); not isinstance, since V_PREDICTION, X0 and LCM all
    subclass EPS. eps and v need the discrete schedule (ModelSamplingDiscrete's sigma/timestep:
    the model's timestep t is the index of sigmas[t]), which the loop's timesteps 0..T-1 and
    alphas_cumprod assume; flow needs a flow schedule (ModelSamplingDiscreteFlow: SD3, Z-Image;
    ModelSamplingFlux). Anything else (x0, LCM, EDM, continuous-time schedules) is refused naming
    the model.
    """
    cls = type(ms)
    parameterization, schedule = _defining_class(cls, "calculate_denoised"), _defining_class(cls, "sigma")
    host = comfy.model_sampling
    kinds = {host.EPS: "eps", host.V_PREDICTION: "v", host.CONST: "flow"}
    schedules = {"eps": (host.ModelSamplingDiscrete,), "v": (host.ModelSamplingDiscrete,),
                 "flow": (host.ModelSamplingDiscreteFlow, host.ModelSamplingFlux)}
    kind = kinds.get(parameterization)
    if kind is None or schedule not in schedules[kind] or _defining_class(cls, "timestep") is not schedule:
        raise ValueError(
            f"model: training supports eps- and v-prediction models on a discrete noise schedule (SD1.x, SD2.x, "
            f"SDXL, also patched by the host's ModelSamplingDiscrete to eps or v_prediction) and rectified-flow "
            f"models (SD3, SD3.5, Flux.1, Z-Image); this one ({architecture}) is "
            f"sampled as {getattr(parameterization, '__name__', None)} on {getattr(schedule, '__name__', None)}")
    return kind


def discrete_schedule(ms) -> torch.Tensor:
    """The training schedule of an eps or v model from the model_sampling `ms` the host samples it
    with (zsnr included): alpha_bar = 1 / (1 + sigma^2), float64 [T]."""
    with torch.inference_mode(False):  # the host's buffers are inference tensors; this is plain maths
        sigmas = ms.sigmas.detach().double().cpu()  # [T]
        return 1.0 / (1.0 + sigmas**2)


def flow_schedule(ms) -> FlowSchedule:
    """A flow model's training schedule from the model_sampling `ms` the host samples it with (its
    shift, also a ModelSamplingSD3/Flux node's): sigma = sigma(timestep(u)), the model's timestep
    input timestep(sigma) (x 1000 for SD3, x 1 for Flux and Z-Image)."""
    settings = {k: getattr(ms, k) for k in ("shift", "multiplier") if hasattr(ms, k)}
    name = f"{type(ms).__name__} " + " ".join(f"{k}={float(v):g}" for k, v in sorted(settings.items()))
    with torch.inference_mode(False):  # the host's buffers are inference tensors; these are plain maths
        return FlowSchedule(sigma=lambda u: torch.as_tensor(ms.sigma(ms.timestep(u))).float(),
                            timestep=lambda sigma: torch.as_tensor(ms.timestep(sigma)).float(), name=name)


def empty_prompt(null_conditioning, clip) -> tuple[torch.Tensor, dict]:
    """The empty prompt's cross-attention [1, tokens, dim] and extras (e.g. pooled_output)."""
    if null_conditioning is None:
        if clip is None:
            raise ValueError("null_conditioning / clip: connect the empty-prompt conditioning, or a CLIP to encode \"\" with")
        null_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    if not null_conditioning:
        raise ValueError("null_conditioning is empty; connect CLIP Text Encode of an empty string")
    cross_attn, extras = null_conditioning[0][0], dict(null_conditioning[0][1])
    return cross_attn[:1].clone(), extras


def cond_function(host: HostModel, cross_attn: torch.Tensor, extras: dict):
    """(height_px, width_px) -> the diffusion model's keyword inputs for the empty prompt at that
    size, built by the base's own extra_conds (SDXL's size embedding 'y', SD3's and Flux's pooled
    'y', Flux dev's guidance (the empty prompt's FluxGuidance, else the host's default), Z-Image's
    token count), named as the family's row says (families.py)."""
    keys = host.family.conds
    passed = {k: extras[k] for k in ("guidance", "attention_mask") if extras.get(k) is not None}
    if extras.get("reference_latents") is not None:  # (ReferenceLatent, TextEncodeQwenImageEdit with an image)
        log.info("null_conditioning: its reference latents are left out of training: the domain model learns the "
                 "domain's images from the empty prompt alone")

    def cond_for(height: int, width: int) -> dict:
        conds = host.extra_conds(cross_attn=cross_attn, pooled_output=extras.get("pooled_output"),
                                 width=width, height=height, target_width=width, target_height=height,
                                 device=torch.device("cpu"), **passed)
        unknown = sorted(set(conds) - set(keys))
        if unknown:
            raise ValueError(f"model: this model needs extra inputs {unknown} (an inpainting or edit model?); "
                             "train from a plain text-to-image base")
        out = {}
        for key, cond in conds.items():
            value = cond.cond
            out[keys[key]] = value.detach().clone().float() if torch.is_tensor(value) and value.is_floating_point() \
                else value.detach().clone() if torch.is_tensor(value) else value
        return out
    return cond_for


def check_vae(vae, host: HostModel) -> None:
    """The VAE must make the latents the model denoises: same channel count, and image latents, or
    video-shaped ones where the model takes those (Qwen-Image: Wan 2.1's VAE, an image one frame)."""
    want, want_dims = host.latent_channels, host.latent_dimensions
    got, got_dims = getattr(vae, "latent_channels", None), getattr(vae, "latent_dim", 2)
    if got != want or got_dims != want_dims:
        shape = {2: "image", 3: "video-shaped"}
        raise ValueError(f"vae: it makes {got}-channel {shape.get(got_dims, f'{got_dims}-D')} latents, but the model "
                         f"({host.architecture}) denoises {want}-channel {shape.get(want_dims, f'{want_dims}-D')} latents; "
                         "use the VAE of the base checkpoint")


def encode_function(vae, host: HostModel, trainer):
    """IMAGE [1, H, W, 3] -> the model's latents [1, C, h, w] (VAE encode, then the latent scaling).
    The VAE runs in the host's inference mode (the host moves it as it always does); the host may
    unload the UNet to make room for it: the MODEL being trained, `trainer`, is loaded again after
    each image."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            latent = host.process_latent_in(vae.encode(pixels)).float()
        load_for_training(trainer)
        if host.latent_dimensions == 3:  # [1, C, 1, h, w]: the image's one frame; the loop's latents have none
            latent = latent.squeeze(2)
        return latent.clone()  # outside inference mode: an ordinary tensor
    return encode


@contextlib.contextmanager
def one_frame(unet: torch.nn.Module, host: HostModel):
    """Within the block, a model of video-shaped latents (Qwen-Image's [B, C, T, h, w]) called with the
    loop's image latents [B, C, h, w] gets them as one frame, and gives its prediction back without
    the frame axis; video-shaped inputs (the host's, sampling a preview) pass as they are. Forward
    hooks on `unet`, so a full copy made of it within the block has them too; removed on exit."""
    if host.latent_dimensions != 3:
        yield
        return
    added = []  # per call, innermost last: whether its input got the frame axis

    def before(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        added.append(x.dim() == 4)
        if not added[-1]:
            return None
        return ((x.unsqueeze(2), *args[1:]), kwargs) if args else (args, {**kwargs, "x": x.unsqueeze(2)})

    def after(module, args, kwargs, output):
        return output.squeeze(2) if added.pop() else None

    handles = [unet.register_forward_pre_hook(before, with_kwargs=True),
               unet.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
