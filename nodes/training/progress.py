"""What the user sees while Train Domain UNet runs: the progress bar and text (step, loss,
images/s, ETA) and the previews (the domain model sampled on the empty prompt by the host). The
validation samples at each checkpoint are samples.py's.
"""
from __future__ import annotations

import os
import sys

import torch
from PIL import Image

import comfy.sample
import folder_paths

from ...training import TrainConfig
from ..dynamic_vram import release
from .differentiable import load_for_training, weights_cast_to_input
from .inputs import HostModel

PREVIEW_STEPS = 20


def preview_function(model, host: HostModel, vae, cross_attn, extras, config: TrainConfig, save_name: str, bar):
    """(step, module being trained) -> one sample of the domain model on the empty prompt (what
    KSampler (Domain Guidance) gives with cfg 0 and domain_scale 1), from the host's own sampler
    with a fixed seed, shown on the node and saved to output/indomain_previews/<save_name>/.
    `model`: the MODEL being trained (the host samples it); `host`: what was read of it."""
    null = [[cross_attn, extras]]
    folder = os.path.join(folder_paths.get_output_directory(), "indomain_previews", save_name)
    ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else getattr(vae, "downscale_ratio", 8)
    side = config.resolution // ratio  # (a video VAE's downscale_ratio is per axis: the method gives the spatial one)

    @torch.inference_mode()  # the host's mode, in which it loads and moves models
    def preview(step: int, module: torch.nn.Module) -> None:
        # the latent the host samples the model on: one frame where its latents are video-shaped (Qwen-Image)
        latent = torch.zeros([1, host.latent_channels] + [1] * (host.latent_dimensions - 2) + [side, side])
        noise = comfy.sample.prepare_noise(latent, config.seed)
        sampled = model
        if config.mode == "full":  # the trained copy stands in for the base's UNet inside each model call
            sampled = model.clone()
            sampled.set_model_unet_function_wrapper(standing_in(model.model, module))
        # The float32 copy's weights cast to the host's compute dtype, as the saved file holds them.
        with weights_cast_to_input(module, config.mode == "full"):
            samples = comfy.sample.sample(sampled, noise, PREVIEW_STEPS, 1.0, "euler", "normal", null, null, latent,
                                          disable_pbar=True, seed=config.seed)
        pixels = vae.decode(samples)[0].clamp(0, 1).mul(255).round().byte().cpu().numpy()  # [H, W, 3]
        image = Image.fromarray(pixels.reshape(pixels.shape[-3:]))
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"step_{step:06d}.png"))
        bar.update_absolute(step, config.steps, ("PNG", image, 512))
        if config.mode == "full":  # the host loaded the base to sample: not needed by the training
            release(model)
        else:
            with torch.inference_mode(False):
                load_for_training(model)  # the host may have moved or unloaded the UNet to sample or decode
    return preview


def standing_in(base_model, module: torch.nn.Module):
    """A model_function_wrapper in which `module` (the copy being trained) computes each model call
    in place of the base's UNet. Only inside the call: the host's model management, which may load
    or unload the base while sampling, never sees the trained copy."""
    def wrapper(apply_model, args):
        original = base_model.diffusion_model
        base_model.diffusion_model = module
        try:
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            base_model.diffusion_model = original
    return wrapper


def text_sender(node_id):
    """text -> the node's progress text in the page (nothing without a running server or node)."""
    server = getattr(sys.modules.get("server"), "PromptServer", None)  # the running ComfyUI server, if any
    send_text = getattr(getattr(server, "instance", None), "send_progress_text", None)

    def say(text: str) -> None:
        if send_text is not None and node_id is not None:
            send_text(text, node_id)
    return say


def progress_reporter(bar, node_id, steps: int):
    """Progress(stage, ...) -> the host's progress bar, and a text line (step, loss, images/s, ETA; or
    the validation loss at a checkpoint)."""
    say = text_sender(node_id)

    def report(p) -> None:
        if p.stage == "cache":
            text = f"encoding images {p.step}/{p.total}"
        elif p.stage == "validation":
            text = f"validation loss {p.loss:.4f} at step {p.step}"
        else:
            bar.update_absolute(p.step, steps)
            text = f"step {p.step}/{p.total}  loss {p.loss:.4f}  {p.images_per_s:.1f} img/s  ETA {p.eta_s:.0f} s"
        say(text)
    return report


def each_of(*callbacks):
    """One on_progress calling each of `callbacks` in turn (None: left out)."""
    given = [c for c in callbacks if c is not None]

    def report(p) -> None:
        for callback in given:
            callback(p)
    return report
