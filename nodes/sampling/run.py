"""A sampling run as the nodes make it: the domain terms from the node's inputs (collect_terms), the
guider over them (make_guider), and what KSampler does around its guider (sample_like_ksampler).
The sampler node, the guider node and Train Domain UNet's validation samples sample through these."""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .domains import DomainTerm
from .guider import DomainGuider

log = logging.getLogger(__name__)


def collect_terms(domain_model, domain_scale, domain_start, domain_end, more_domains) -> list[DomainTerm]:
    terms = []
    if domain_model is not None:
        terms.append(DomainTerm(domain_model, domain_scale, domain_start, domain_end, name="domain_model"))
    terms.extend(more_domains or [])
    if not terms:
        log.info("no domain model connected: sampling as a plain KSampler")
    return terms


def make_guider(model, positive, negative, null_conditioning, cfg, terms, control_in_domain,
                domain_every: int = 1) -> DomainGuider:
    guider = DomainGuider(model, terms, control_in_domain=control_in_domain, domain_every=domain_every)
    guider.set_conds(positive, negative, null_conditioning)
    guider.set_cfg(cfg)
    return guider


def sample_like_ksampler(guider, seed, steps, sampler_name, scheduler, latent, denoise, callback=None, disable_pbar=None):
    """What KSampler does around its guider: noise from the seed, sigmas from steps/denoise, masks.
    callback(step, x0, x, total_steps) and disable_pbar, where given, stand for KSampler's latent
    previews and console bar (Train Domain UNet's validation samples report on the node instead)."""
    model = guider.model_patcher
    latent_image = _empty_latent_as_the_model_takes_it(model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    schedule = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    if callback is None:
        callback = latent_preview.prepare_callback(model, steps)
    if disable_pbar is None:
        disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), schedule.sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar, seed=seed)
    out = {k: v for k, v in latent.items() if k not in _EMPTY_LATENT_RATIOS}  # as KSampler: said of the input only
    mm = comfy.model_management  # (0.33's --fp16-intermediates: KSampler's LATENT is fp16; older hosts keep the dtype)
    out["samples"] = samples.to(device=mm.intermediate_device(),
                                dtype=mm.intermediate_dtype() if hasattr(mm, "intermediate_dtype") else samples.dtype)
    return out


# What newer empty-latent nodes say of the latent they made (ComfyUI 0.33's Empty Latent Image: made for an 8x VAE)
_EMPTY_LATENT_RATIOS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def _empty_latent_as_the_model_takes_it(model, latent: dict):
    """KSampler's fix of an empty latent: the model's channels, dimensions and, where the empty-latent node
    says for which downscale it was made (0.33+), the model's latent size (Flux.2 from Empty Latent Image:
    128 channels at 16x)."""
    ratios = [latent.get(key) for key in _EMPTY_LATENT_RATIOS]
    if any(r is not None for r in ratios):  # (hosts before 0.33 neither set nor take them)
        return comfy.sample.fix_empty_latent_channels(model, latent["samples"], *ratios)
    return comfy.sample.fix_empty_latent_channels(model, latent["samples"])
