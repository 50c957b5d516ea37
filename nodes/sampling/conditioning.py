"""The host CONDITIONING the guider reads, checks and builds for its rows.

- checks of the user's inputs: check_text_width (a prompt encoded with another model's CLIP),
  same_conditioning (the negative is the empty prompt, so one row serves n and u; by value, with
  fastpath.difference);
- the empty prompt of the domain rows: with_prompt_guidance (a guidance-distilled model's guidance
  value taken from the positive), with_values (entries set on every row), positive_control (the
  positive's ControlNet, for control_in_domain);
- a LoRA domain that is not plain LoRA rides in the base's call as a weight hook, the host's per-row
  mechanism: patch_difference (its patches on top of the base's) and hook_group (them as a hook).
"""
from __future__ import annotations

import logging
import uuid

import comfy.hooks
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from .fastpath import difference

log = logging.getLogger(__name__)


def same_conditioning(a, b) -> bool:
    """True when two CONDITIONING lists are the same prompt (so one model row serves both): equal
    tensors and entries, compared by value inside lists and dicts too (an edit model's
    reference_latents: the same picture loaded twice gives equal lists of other tensors)."""
    if a is b:
        return True
    return len(a) == len(b) and all(difference(ta, tb) is None and difference(da, db) is None
                                    for (ta, da), (tb, db) in zip(a, b))


def check_text_width(base, conditioning, input_name: str) -> None:
    """ValueError naming `input_name` when its text embedding is not as wide as the base's
    cross-attention takes (context_dim of the base's UNet config; other models are not checked)."""
    model = base.model
    expected = model.model_config.unet_config.get("context_dim")
    if expected is None or not isinstance(model.diffusion_model, UNetModel) or hasattr(model, "cc_projection"):
        return  # (Stable Zero123 projects other widths itself)
    for tensor, _ in conditioning:
        if tensor.shape[-1] != expected:
            fix = "encode the empty prompt" if input_name == "null_conditioning" else "encode it"
            raise ValueError(
                f"{input_name}: its text embedding is {tensor.shape[-1]} wide, but the base model "
                f"({type(model.model_config).__name__}) takes {expected}: {fix} with the base checkpoint's CLIP"
            )


def with_values(conditioning, values: dict):
    """A CONDITIONING list with `values` set on every entry (the entries are copied)."""
    return [[t, {**d, **values}] for t, d in conditioning]


GUIDANCE = "guidance"  # a guidance-distilled model's guidance value (Flux.1 dev: FluxGuidance), read per row
_NO_GUIDANCE = object()


def with_prompt_guidance(null, positive):
    """The empty prompt for the domain rows u and d_k, at the prompt's guidance value.

    A guidance-distilled model (Flux.1 dev) reads its guidance embedding from each row's conditioning.
    The domain term w (d - u) is added to the prompt's prediction c, so u and d are computed at c's
    guidance: the positive's value (its first entry that has one), or none (the model's default) when
    the positive has none; the empty prompt's own value is not used. The null list itself when it
    already has that value on every entry (models without a guidance embedding never see a change)."""
    wanted = next((d[GUIDANCE] for _, d in positive if GUIDANCE in d), _NO_GUIDANCE)
    if all(d.get(GUIDANCE, _NO_GUIDANCE) is wanted or d.get(GUIDANCE, _NO_GUIDANCE) == wanted for _, d in null):
        return null
    log.info("domain rows: the empty prompt takes the prompt's guidance (%s)",
             "the model's default" if wanted is _NO_GUIDANCE else wanted)
    if wanted is _NO_GUIDANCE:
        return [[t, {k: v for k, v in d.items() if k != GUIDANCE}] for t, d in null]
    return with_values(null, {GUIDANCE: wanted})


def positive_control(positive):
    """The positive's ControlNet (its first entry that has one), or None."""
    for _, d in positive:
        if d.get("control") is not None:
            return d["control"]
    return None


class PatchDiffHook(comfy.hooks.WeightHook):
    """A weight hook carrying ready-made patch lists (key -> [patch tuples]) of a LoRA domain."""

    def __init__(self, patch_lists: dict | None = None):
        super().__init__()
        self.patch_lists = patch_lists or {}

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if target_dict.get("target") == comfy.hooks.EnumWeightTarget.Clip:
            return False
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        current = model.hook_patches.get(self.hook_ref, {})
        for key, patches in self.patch_lists.items():
            current.setdefault(key, []).extend(patches)
        model.hook_patches[self.hook_ref] = current
        model.patches_uuid = uuid.uuid4()
        registered.add(self)
        return True

    def clone(self):
        c = super().clone()
        c.patch_lists = self.patch_lists
        return c


def patch_difference(base, domain) -> dict:
    """The weight patches a clone `domain` has on top of `base` (key -> list of patch tuples).

    Raises ValueError if the domain clone lost or reordered patches of the base, which no
    per-row adapter can express.
    """
    extra = {}
    for key, patches in domain.patches.items():
        base_patches = base.patches.get(key, [])
        if len(patches) < len(base_patches) or any(a is not b for a, b in zip(patches, base_patches)):
            raise ValueError(
                f"domain model is a patched copy of the base whose patches on '{key}' do not extend the base's; "
                "load it with Load Domain UNet from the base model it was trained on"
            )
        if len(patches) > len(base_patches):
            extra[key] = list(patches[len(base_patches):])
    missing = set(base.patches) - set(domain.patches)
    if missing:
        raise ValueError(f"domain model lacks {len(missing)} weight patches of the base (e.g. '{sorted(missing)[0]}')")
    return extra


def hook_group(patch_lists: dict) -> "comfy.hooks.HookGroup":
    """A LoRA domain's extra patches (patch_difference) as the hooks entry of its row's conditioning."""
    group = comfy.hooks.HookGroup()
    group.add(PatchDiffHook(patch_lists))
    return group
