"""Host objects -> what training.train takes.

Everything the loop needs comes from the host: the UNet module (weights with the base's LoRAs
merged, loaded by the host's model management), the VAE encode, the latent scaling, the noise
schedule and prediction type of the model_sampling the host samples it with (the base's own,
or a node's patch of it), and the empty-prompt conditioning (with SDXL's size embedding from
the base's extra_conds).
"""
from __future__ import annotations

import contextlib
import logging
import weakref

import torch

import comfy.model_management
import comfy.model_sampling

from ...training import FlowSchedule
from ..dynamic_vram import cannot_copy, non_dynamic_copy, patcher_is_dynamic, release
from .families import family_of

log = logging.getLogger(__name__)
_NONE = object()  # a layer without a comfy_cast_weights of its own (only its class's)
_copies = weakref.WeakSet()  # the host's non-dynamic copies that for_training made


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


def for_training(model):
    """The MODEL to train on: `model` itself, or under the host's dynamic VRAM (ComfyUI 0.33+ on
    NVIDIA, where the weights stay in host memory and each layer pages its weights into a VRAM slot
    per call, outside autograd) the host's own non-dynamic delegate of it: the same file and patches
    loaded as a classic model (what the host itself uses for weight hooks; cached on the patcher,
    at the cost of a second copy of the weights in RAM)."""
    if not patcher_is_dynamic(model):
        return model
    if cannot_copy(model):
        raise ValueError(
            "model: under ComfyUI's dynamic VRAM, training needs a base MODEL that the host can load "
            "again without it, i.e. one from the host's own loaders (Load Checkpoint, Load Diffusion "
            "Model); this one came from a node that gives no such recipe. Load the base with the host's "
            "loader, or start ComfyUI with --disable-dynamic-vram")
    log.info("dynamic VRAM: training on the host's non-dynamic copy of the base (its weights on the GPU, "
             "for autograd)")
    copy = non_dynamic_copy(model)
    _copies.add(copy)
    return copy


def load_for_training(model) -> torch.nn.Module:
    """The base's UNet on the device, whole (the host's model management loads it, with the base's
    LoRAs merged), its weights usable by autograd. Cheap when it is loaded already; called again
    wherever the host may have unloaded it (VAE encoding, previews), so that training goes on with
    the weights it trains, where it trains them. If it fails on a copy that for_training made, the
    copy is released (dynamic_vram.release) before the error goes on: the host lists it among its
    loaded models once it loads it, and a failure here may come before its caller releases it."""
    try:
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        unet = model.model.diffusion_model
        make_autograd_safe(unet)
    except BaseException:
        if model in _copies:
            release(model)
        raise
    return unet


@contextlib.contextmanager
def weights_cast_to_input(module: torch.nn.Module, needed: bool = True):
    """Within the block, every layer of `module` casts its weight to its input's dtype, by the
    host's own manual cast (the comfy_cast_weights flag of its ops, what the host sets for weights
    stored in a dtype the GPU does not compute in). On exit, also on error, each layer's flag is
    exactly what it was: its own value again, or none of its own where only its class had one.

    Needed wherever a layer meets inputs of another dtype than its weights without autocast: on
    a GPU the host keeps the UNet in fp16/bf16 and calls it without casting, so training it in
    fp32 (LoRA mode) feeds fp32 activations to fp16 weights; a float32 full copy standing in for
    the host's UNet in a preview gets the host's fp16 inputs. Layers without the flag (not the
    host's ops) are left alone."""
    changed = [m for m in module.modules() if getattr(m, "comfy_cast_weights", None) is False] if needed else []
    before = [m.__dict__.get("comfy_cast_weights", _NONE) for m in changed]
    for m in changed:
        m.comfy_cast_weights = True
    try:
        yield len(changed)
    finally:
        for m, flag in zip(changed, before):
            if flag is _NONE:
                m.__dict__.pop("comfy_cast_weights", None)
            else:
                m.__dict__["comfy_cast_weights"] = flag


def mixed_dtypes(module: torch.nn.Module, compute: torch.dtype) -> bool:
    """True if some floating-point weight of `module` is stored in another dtype than `compute`."""
    return any(p.is_floating_point() and p.dtype != compute for p in module.parameters())


def _replace_tensors(module: torch.nn.Module, wanted) -> int:
    """Replace each parameter and buffer t of `module` with wanted(t) is True by a copy with the same
    values, made in the current inference mode (a Parameter stays a Parameter, its flag kept).
    Returns how many were replaced. The copy reads t without a view of it: a tensor in the state
    described at make_autograd_safe refuses views."""
    replaced = 0
    with torch.no_grad():
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for name, t in store.items():
                    if t is not None and wanted(t):
                        copy = torch.empty_like(t).copy_(t)
                        store[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy
                        replaced += 1
    return replaced


def _not_for_autograd(t: torch.Tensor) -> bool:
    """An inference tensor, or a tensor without a version counter: a Parameter made outside
    inference mode whose data the host replaced inside it (moving the model between devices
    while it executes a graph)."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace the host's weights that autograd cannot use (created under the host's inference mode,
    which autograd refuses to save for backward, or left without a version counter) by ordinary
    copies with the same values. Returns how many were replaced. give_back_to_host undoes it."""
    with torch.inference_mode(False):
        return _replace_tensors(module, _not_for_autograd)


def give_back_to_host(module: torch.nn.Module) -> int:
    """The host's weights as the host makes them: inference tensors (it loads and moves models while
    it executes a graph, in inference mode; an ordinary Parameter whose data it then replaced by an
    inference tensor would refuse every view, in the host's sampling as in the next training)."""
    with torch.inference_mode():
        return _replace_tensors(module, lambda t: not t.is_inference())


@contextlib.contextmanager
def weights_for_autograd(model):
    """Within the block the base's UNet is loaded (load_for_training) with weights autograd can use;
    afterwards, also after an error or Cancel, its weights are the host's kind again."""
    try:
        yield load_for_training(model)
    finally:
        give_back_to_host(model.model.diffusion_model)


def checkpointed_blocks(model) -> tuple[str, ...]:
    """The blocks gradient checkpointing recomputes, from the family's row (families.py)."""
    return family_of(model).blocks(model.model.diffusion_model)


