"""What every node of the pack declares alike: its menu category, and the schema fields that only
newer hosts know, passed only where the host's V3 schema has them.

ComfyUI 0.33's `io.Schema` has `search_aliases` (the node search also finds these words) and its
inputs take `advanced=True` (folded away until the user shows advanced inputs); 0.8.0 has neither
and would refuse them, so there the nodes are declared without them.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging

from comfy_api.latest import io

log = logging.getLogger(__name__)

CATEGORY = "in-domain"  # the node menu's folder of every node of the pack

HAS_SEARCH_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}
HAS_ADVANCED_INPUTS = "advanced" in inspect.signature(io.Input.__init__).parameters


def schema(*, search_aliases: list[str], **fields) -> io.Schema:
    """io.Schema(**fields), with search_aliases where the host supports them."""
    if HAS_SEARCH_ALIASES:
        fields["search_aliases"] = list(search_aliases)
    return io.Schema(**fields)


def advanced() -> dict:
    """Keyword arguments that mark an input as advanced, where the host supports it: io.Int.Input(..., **advanced())."""
    return {"advanced": True} if HAS_ADVANCED_INPUTS else {}


if not (HAS_SEARCH_ALIASES and HAS_ADVANCED_INPUTS):
    log.debug("this ComfyUI's node schema has no search_aliases / advanced inputs: the nodes are declared without them")
