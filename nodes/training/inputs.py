"""Host objects -> what training.train takes.

Everything the loop needs comes from the host: the UNet module (weights with the base's LoRAs
merged, loaded by the host's model management; made usable by autograd in differentiable.py),
the VAE encode, the latent scaling, the noise
schedule and prediction type of the model_sampling the host samples it with (the base's own,
or a node's patch of it), and the empty-prompt conditioning (with SDXL's size embedding from
the base's extra_conds).
"""
from __future__ import annotations

import torch

import comfy.model_sampling

from ...training import FlowSchedule
from .differentiable import load_for_training
from .families import family_of


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
    """The prediction type, "eps", "v" or "flow": how the host reads the model's output, from the
    class of the model_sampling it samples with.

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
    cls = type(model_sampling(model))
    parameterization, schedule = _defining_class(cls, "calculate_denoised"), _defining_class(cls, "sigma")
    ms = comfy.model_sampling
    kinds = {ms.EPS: "eps", ms.V_PREDICTION: "v", ms.CONST: "flow"}
    schedules = {"eps": (ms.ModelSamplingDiscrete,), "v": (ms.ModelSamplingDiscrete,),
                 "flow": (ms.ModelSamplingDiscreteFlow, ms.ModelSamplingFlux)}
    kind = kinds.get(parameterization)
    if kind is None or schedule not in schedules[kind] or _defining_class(cls, "timestep") is not schedule:
        raise ValueError(
            f"model: training supports eps- and v-prediction models on a discrete noise schedule (SD1.x, SD2.x, "
            f"SDXL, also patched by the host's ModelSamplingDiscrete to eps or v_prediction) and rectified-flow "
            f"models (SD3, SD3.5, Flux.1, Z-Image); this one ({type(model.model.model_config).__name__}) is "
            f"sampled as {getattr(parameterization, '__name__', None)} on {getattr(schedule, '__name__', None)}")
    return kind


def alphas_cumprod(model) -> torch.Tensor | None:
    """The training schedule of an eps or v model from the model_sampling the host samples with
    (zsnr included): alpha_bar = 1 / (1 + sigma^2), float64 [T]. None for a flow model."""
    if prediction_type(model) == "flow":
        return None
    sigmas = model_sampling(model).sigmas.detach().double().cpu()  # [T]
    return 1.0 / (1.0 + sigmas**2)


def flow_schedule(model) -> FlowSchedule | None:
    """A flow model's training schedule from the model_sampling the host samples it with (its
    shift, also a ModelSamplingSD3/Flux node's): sigma = sigma(timestep(u)), the model's timestep
    input timestep(sigma) (x 1000 for SD3, x 1 for Flux and Z-Image). None for eps and v models."""
    if prediction_type(model) != "flow":
        return None
    ms = model_sampling(model)
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


def cond_function(model, cross_attn: torch.Tensor, extras: dict):
    """(height_px, width_px) -> the diffusion model's keyword inputs for the empty prompt at that
    size, built by the base's own extra_conds (SDXL's size embedding 'y', SD3's and Flux's pooled
    'y', Flux dev's guidance (the empty prompt's FluxGuidance, else the host's default), Z-Image's
    token count), named as the family's row says (families.py)."""
    keys = family_of(model).conds
    passed = {k: extras[k] for k in ("guidance", "attention_mask") if extras.get(k) is not None}

    def cond_for(height: int, width: int) -> dict:
        conds = model.model.extra_conds(cross_attn=cross_attn, pooled_output=extras.get("pooled_output"),
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


def check_vae(vae, model) -> None:
    """The VAE must make the latents the model denoises: same channel count, image (not video) latents."""
    want = model.model.latent_format.latent_channels
    got = getattr(vae, "latent_channels", None)
    if got != want or getattr(vae, "latent_dim", 2) != 2:
        raise ValueError(f"vae: it makes {got}-channel latents, but the model ({type(model.model.model_config).__name__}) "
                         f"denoises {want}-channel image latents; use the VAE of the base checkpoint")


def encode_function(vae, model):
    """IMAGE [1, H, W, 3] -> the model's latents [1, C, h, w] (VAE encode, then the latent scaling).
    The VAE runs in the host's inference mode (the host moves it as it always does); the host may
    unload the UNet to make room for it: the UNet is loaded again after each image."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            latent = model.model.process_latent_in(vae.encode(pixels)).float()
        load_for_training(model)
        return latent.clone()  # outside inference mode: an ordinary tensor
    return encode


def checkpointed_blocks(model) -> tuple[str, ...]:
    """The blocks gradient checkpointing recomputes, from the family's row (families.py)."""
    return family_of(model).blocks(model.model.diffusion_model)


