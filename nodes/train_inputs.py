"""Host objects -> what training.train takes.

Everything the loop needs comes from the host: the UNet module (weights with the base's LoRAs
merged, loaded by the host's model management), the VAE encode, the latent scaling, the noise
schedule and prediction type of the base's own model_sampling, and the empty-prompt conditioning
(with SDXL's size embedding from the base's extra_conds).
"""
from __future__ import annotations

import torch

def prediction_type(model) -> str:
    name = model.model.model_type.name
    kinds = {"EPS": "eps", "V_PREDICTION": "v"}
    if name not in kinds:
        raise ValueError(f"model: training supports eps- and v-prediction models (SD1.x, SD2.x, SDXL); this one is {name}")
    return kinds[name]


def alphas_cumprod(model) -> torch.Tensor:
    """The base's training schedule from its own model_sampling: alpha_bar = 1 / (1 + sigma^2)."""
    sigmas = model.get_model_object("model_sampling").sigmas.detach().double().cpu()  # [T]
    return 1.0 / (1.0 + sigmas**2)


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
    """(height_px, width_px) -> the UNet's keyword inputs for the empty prompt at that size,
    built by the base's own extra_conds (SDXL's size embedding 'y' included)."""
    def cond_for(height: int, width: int) -> dict[str, torch.Tensor]:
        conds = model.model.extra_conds(cross_attn=cross_attn, pooled_output=extras.get("pooled_output"),
                                        width=width, height=height, target_width=width, target_height=height,
                                        device=torch.device("cpu"))
        unknown = sorted(set(conds) - {"c_crossattn", "y"})
        if unknown:
            raise ValueError(f"model: this model needs extra inputs {unknown} (an inpainting or edit model?); "
                             "train from a plain text-to-image base")
        out = {"context": conds["c_crossattn"].cond}
        if "y" in conds:
            out["y"] = conds["y"].cond
        return {k: v.detach().clone().float() for k, v in out.items()}
    return cond_for


def check_vae(vae, model) -> None:
    """The VAE must make the latents the model denoises: same channel count, image (not video) latents."""
    want = model.model.latent_format.latent_channels
    got = getattr(vae, "latent_channels", None)
    if got != want or getattr(vae, "latent_dim", 2) != 2:
        raise ValueError(f"vae: it makes {got}-channel latents, but the model ({type(model.model.model_config).__name__}) "
                         f"denoises {want}-channel image latents; use the VAE of the base checkpoint")


def encode_function(vae, model):
    """IMAGE [1, H, W, 3] -> the model's latents [1, C, h, w] (VAE encode, then the latent scaling)."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.model.process_latent_in(vae.encode(pixels)).float().clone()
    return encode


@torch.no_grad()
def make_autograd_safe(module: torch.nn.Module) -> int:
    """Replace weights created under the host's inference mode (which autograd refuses to save for
    backward) by ordinary copies with the same values. Returns how many were replaced."""
    replaced = 0
    for owner in module.modules():
        for store in (owner._parameters, owner._buffers):
            for name, t in store.items():
                if t is not None and t.is_inference():
                    copy = t.detach().clone()
                    store[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else copy
                    replaced += 1
    return replaced


def checkpointed_blocks(unet: torch.nn.Module) -> tuple[str, ...]:
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


