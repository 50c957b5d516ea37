"""The domain terms of a sampling run: what the user asks for (DomainTerm, a list of them the
nodes' DOMAIN_TERMS type), how each is evaluated (kind_of), and its state inside a run
(DomainState). The kinds, as the guider's module docstring describes them:

- "off": weight 0, not evaluated at all (not even loaded);
- "same": the base's own weights, so d = u and the term is zero;
- "adapter": a plain LoRA of the base, run as adapters on the base's modules (lora_adapters.py);
- "hook": another patch of the base, a weight hook in the base's batched call;
- "model": a separately loaded model (a full-copy domain UNet) in its own call.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_patcher

from ..domain_files import check_compatible
from ...guidance import TermInterval, percent_to_step_fraction
from . import fastpath
from .lora_adapters import LoraBranch

DOMAIN_TERMS = "INDOMAIN_TERMS"  # the node type of a list[DomainTerm]


@dataclass(frozen=True)
class DomainTerm:
    """One domain term of the sum: weight * (domain(x, "") - base(x, "")) within [start, end]."""

    model: "comfy.model_patcher.ModelPatcher"
    weight: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    name: str = "domain"

    def __post_init__(self):
        percent_to_step_fraction(self.start_percent, self.end_percent)


def kind_of(base, model) -> str:
    """How a domain `model` with a non-zero weight is evaluated beside the `base` patcher: "same"
    (the base's weights), "hook" (a patched clone of the base; set_conds may make it "adapter") or
    "model" (a separately loaded model)."""
    if model is base or base.clone_has_same_weights(model):
        return "same"
    if model.is_clone(base):
        return "hook"
    return "model"


def check_domain_model(base, term: "DomainTerm") -> None:
    """DomainModelError naming the input of a separately loaded domain model whose family,
    architecture or prediction type is not the base's."""
    subject = term.name if term.name == "domain_model" else f"more_domains {term.name}"
    check_compatible(term.model, base, what=subject)


class DomainState:
    """Run-time state of one domain term inside a sampling run."""

    def __init__(self, index: int, term: DomainTerm, kind: str):
        self.index = index
        self.term = term
        self.kind = kind  # "off" | "same" | "adapter" | "hook" | "model"
        self.key = f"indomain_domain_{index}"
        self.interval: TermInterval | None = None
        self.inner_model = None
        self.model_options = None
        self.branches: list[LoraBranch] | None = None  # kind "adapter": on the modules of the model that runs
        self.patches: dict | None = None  # kind "adapter": the LoRA's weight patches (key -> patch tuples)
        self.fast: fastpath.DomainForward | None = None
