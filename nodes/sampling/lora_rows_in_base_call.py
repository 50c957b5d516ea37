"""A LoRA domain's rows in the base's model call (direct path only).

Without CUDA graphs (INDOMAIN_FAST_DOMAIN=eager, ComfyUI's --disable-cuda-graphs, a failed capture)
each recorded call costs its kernel launches and the host's per-layer work on the CPU, which is
the bound at batch 1: a LoRA domain's own call was a second UNet call per step. A LoRA domain
runs on the base's modules, so its rows can ride in the base's call: the two records' inputs
concatenated along the batch, the LoRA added to the domain rows only (lora_hooks.lora_applied's `rows`).
Made only where both records are direct calls of the same model with conditioning that
concatenates (same keys, tensors of the same shape past the batch); otherwise, or if a layer
sees another batch than the call's, the separate calls, for the rest of the run.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ...lora_hooks import RowsMismatch, lora_applied
from .fastpath import RecordedCall, apply_recorded, difference, split_rows

log = logging.getLogger(__name__)


class LoraRowsInBaseCall:
    """The base's rows and the LoRA domains' rows in one model call (direct path only)."""

    def __init__(self, base: RecordedCall, domains: list):
        self.base, self.domains = base, domains  # DomainForward of LoRA domains on base.model
        self.joined: dict = {}  # ids of (base record, domain records) -> (those records, the call's kwargs or None)
        self.failed = False  # a layer saw another batch: separate calls for the rest of the run

    def __call__(self, rows: list, x, timestep, options) -> tuple[list, list] | None:
        """([base prediction per row], [domain prediction per domain]), or None: make the separate calls."""
        recs = [self.base.direct_record(rows, x, options)] + [d.call.direct_record([d.get_cond()], x) for d in self.domains]
        kwargs = None if self.failed or None in recs else self._kwargs(recs)
        if kwargs is None:
            return None
        b, n_base = x.shape[0], len(recs[0].order)
        n = n_base + len(self.domains)
        try:
            with contextlib.ExitStack() as stack:
                for i, d in enumerate(self.domains):
                    stack.enter_context(lora_applied(d.call.branches, d.call.cache, rows=((n_base + i) * b, b), batch=n * b))
                out = apply_recorded(self.base.model, kwargs, n, x, timestep)
        except RowsMismatch as e:
            self.failed = True
            log.info("%s: LoRA domain rows in calls of their own (%s)", self.base.name, e)
            return None
        return split_rows(recs[0], out[:n_base * b], rows, x), [d.to(x.dtype) for d in out[n_base * b:].chunk(len(self.domains))]

    def _kwargs(self, recs: list) -> dict | None:
        """The one call's keyword arguments, made once per set of records; None if the records'
        conditioning does not concatenate."""
        key = tuple(id(r) for r in recs)
        if key not in self.joined:
            kwargs = _joined_kwargs([r.kwargs for r in recs])
            self.joined[key] = (recs, kwargs)  # the records held, so that their ids stay theirs
            names = ", ".join(d.call.name for d in self.domains)
            log.info("%s: the rows of %s in the base's call" if kwargs is not None else
                     "%s: the rows of %s in calls of their own (conditioning that does not concatenate)", self.base.name, names)
        return self.joined[key][1]


def _joined_kwargs(records: list[dict]) -> dict | None:
    """The records' apply_model keyword arguments as one call's (rows of the first, then the others'),
    or None if they do not concatenate."""
    first = records[0]
    if any(set(r) != set(first) for r in records):
        return None
    joined = {}
    for k, v in first.items():
        values = [r[k] for r in records]
        if k == "transformer_options":
            v = _joined_transformer_options(values)
            if v is None:
                return None
        elif torch.is_tensor(v):
            if not all(torch.is_tensor(o) and o.shape[1:] == v.shape[1:] and o.dtype == v.dtype and o.device == v.device for o in values):
                return None
            v = torch.cat(values)
        elif any(difference(o, v) is not None for o in values):
            return None
        joined[k] = v
    return joined


def _joined_transformer_options(values: list[dict]) -> dict | None:
    """One dict for the one call: the per-row lists concatenated, every other entry the same in all."""
    per_row = ("cond_or_uncond", "uuids")
    first = values[0]
    if any(set(o) - {"sigmas"} != set(first) - {"sigmas"} for o in values):
        return None
    if any(difference(o[k], first[k]) is not None for o in values for k in first if k not in per_row and k != "sigmas"):
        return None
    joined = dict(first)
    for k in per_row:
        if k in first:
            joined[k] = [item for o in values for item in o[k]]
    return joined

