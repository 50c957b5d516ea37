"""The domain terms of a sampling run: what the user asks for (DomainTerm, a list of them the
nodes' DOMAIN_TERMS type), how each is evaluated (DomainKind, chosen by kind_of), and its state
inside a run (DomainState).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import comfy.model_patcher

from ...guidance import TermInterval, check_percent_interval
from ...lora_hooks import LoraBranch
from ..domain_files import check_compatible

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
        check_percent_interval(self.start_percent, self.end_percent)


class DomainKind(enum.Enum):
    """How a domain term's row is evaluated (the guider's module docstring tells each in full)."""

    OFF = "off"  # weight 0: not evaluated at all (not even loaded); the term is zero
    SAME = "same"  # the base's own weights: d = u, the term is zero
    ADAPTER = "adapter"  # a plain LoRA of the base: adapters on the base's own modules (lora_hooks/, lora_adapters.py)
    HOOK = "hook"  # another patch of the base: a weight hook in the base's batched call
    MODEL = "model"  # a separately loaded model (a full-copy domain UNet), in a call of its own

    @property
    def evaluated(self) -> bool:
        """True where the term has a row of its own to compute (not OFF, not SAME)."""
        return self not in (DomainKind.OFF, DomainKind.SAME)


def kind_of(base, model) -> DomainKind:
    """How a domain `model` with a non-zero weight is evaluated beside the `base` patcher: SAME (the
    base's weights), HOOK (a patched clone of the base; the guider makes a plain LoRA ADAPTER where
    it can) or MODEL (a separately loaded model)."""
    if model is base or base.clone_has_same_weights(model):
        return DomainKind.SAME
    if model.is_clone(base):
        return DomainKind.HOOK
    return DomainKind.MODEL


def check_domain_model(base, term: "DomainTerm") -> None:
    """DomainModelError naming the input of a separately loaded domain model whose family,
    architecture or prediction type is not the base's."""
    subject = term.name if term.name == "domain_model" else f"more_domains {term.name}"
    check_compatible(term.model, base, what=subject)


class DomainState:
    """Run-time state of one domain term inside a sampling run."""

    def __init__(self, index: int, term: DomainTerm, kind: DomainKind):
        self.index = index
        self.term = term
        self.kind = kind
        self.key = f"indomain_domain_{index}"
        self.interval: TermInterval | None = None
        self.inner_model = None
        self.model_options = None
        self.branches: list[LoraBranch] | None = None  # ADAPTER: on the modules of the model that runs
        self.patches: dict | None = None  # ADAPTER: the LoRA's weight patches (key -> patch tuples)
