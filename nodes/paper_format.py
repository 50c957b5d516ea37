"""The authors' own domain checkpoints (Cao et al.'s code): a "null-text" SD1.5 UNet in diffusers
layout whose cross-attention layers are gone.

Their domain UNet is trained on the empty prompt only, so each transformer block's cross-attention
(`attn2`) is replaced by a constant: the block adds a learned feature (a buffer `null_text_feature`
of shape [1, 1, C]) to its residual stream where attention's output would be, and the LayerNorm in
front of it (`norm2`) is the identity. The file therefore has diffusers key names, no `attn2`
weights, and one `null_text_feature` per transformer block.

In the host's UNet the same block computes x + to_out(attention(norm2(x), context)); with the
output projection's weight 0 and its bias the feature, that is x + feature whatever attention and
norm2 compute: exactly the authors' block. So such a file loads as a full copy of the base's
architecture (domain_files.model_from_base_config) with those values in each attn2.
"""
from __future__ import annotations

import torch

FEATURE = "null_text_feature"


def is_paper_format(tensors: dict[str, torch.Tensor]) -> bool:
    """Diffusers UNet key names with null-text features or without any cross-attention weights."""
    diffusers = "conv_in.weight" in tensors and any(k.startswith(("down_blocks.", "up_blocks.")) for k in tensors)
    return diffusers and (any(k.endswith(FEATURE) for k in tensors) or not any(".attn2." in k for k in tensors))


def _feature_for(tensors: dict, block: str):
    """The feature of the transformer block `block` (diffusers path), stored beside it or in attn2's place."""
    for key in (f"{block}.attn2.{FEATURE}", f"{block}.{FEATURE}"):
        if key in tensors:
            return tensors[key]
    return None


def to_host_unet(tensors: dict[str, torch.Tensor], base, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors as the base's UNet state dict (host key names), each attn2 a constant.

    Raises ValueError naming the file when a transformer block has no feature, when the file's
    weights do not fit the base's architecture, or when weights the base needs are missing."""
    import comfy.utils

    want = base.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(base.model.model_config.unet_config)  # diffusers key -> host key
    out: dict[str, torch.Tensor] = {}
    for diffusers_key, host_key in mapping.items():
        if diffusers_key in tensors:
            out[host_key] = tensors[diffusers_key]
    blocks = sorted({k.rsplit(".attn2.", 1)[0] for k in mapping if ".attn2." in k})
    for block in blocks:
        feature = _feature_for(tensors, block)
        if feature is None:
            raise ValueError(f"domain UNet '{name}' is in the authors' null-text layout (diffusers names, no "
                             f"cross-attention) but has no {FEATURE} for the transformer block '{block}': "
                             "the file is incomplete or not such a checkpoint")
        prefix = mapping[f"{block}.attn2.to_out.0.weight"].rsplit(".to_out.0.weight", 1)[0]
        norm = prefix.rsplit(".attn2", 1)[0] + ".norm2"
        bias = want[f"{prefix}.to_out.0.bias"]
        if feature.numel() != bias.numel():
            raise ValueError(f"domain UNet '{name}': the {FEATURE} of '{block}' has {feature.numel()} values, the "
                             f"base's block {bias.numel()} channels: it was trained for another base model")
        for key in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"):
            out[f"{prefix}.{key}"] = torch.zeros_like(want[f"{prefix}.{key}"])
        out[f"{prefix}.to_out.0.bias"] = feature.reshape(bias.shape).to(bias.dtype)
        for key, fill in (("weight", torch.ones_like), ("bias", torch.zeros_like)):  # norm2: the identity's stand-in
            out.setdefault(f"{norm}.{key}", fill(want[f"{norm}.{key}"]))
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(f"domain UNet '{name}' (the authors' null-text layout) lacks {len(missing)} weights of the "
                         f"base's UNet (e.g. '{missing[0]}'): it was trained for another base model")
    wrong = [k for k in out if tuple(out[k].shape) != tuple(want[k].shape)]
    if wrong:
        raise ValueError(f"domain UNet '{name}' (the authors' null-text layout): '{wrong[0]}' has shape "
                         f"{list(out[wrong[0]].shape)}, the base's {list(want[wrong[0]].shape)}: trained for another base")
    return out
