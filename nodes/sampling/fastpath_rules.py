"""When the fast path may stand in for the host's call: the rules, each a function returning why
not (a sentence for the log) or None.

- plain_cond: a row is one plain conditioning entry (no area, mask, ControlNet, hooks, timestep
  range...), so the host's prediction for it is the one model call's output;
- host_state_reason: the host's calc_cond_batch does nothing per step beyond that call (no
  wrappers of the whole call, per-step callbacks, hook weight swaps, multi-GPU split);
- graph_reason: the recorded call may be a CUDA graph (no Python inside the forward that may act
  differently per step, weights at fixed addresses on the GPU, or in dynamic VRAM's slots, and no
  block streaming of the host's own inside the forward: dynamic_vram.py).
"""
from __future__ import annotations

from .. import dynamic_vram
from ..host_memory import host_flag_reason
from .lora_adapters import HOST_COMPILE_KEY, HOST_COMPILE_KWARGS

# Entries of a cond that make its prediction more than one plain apply_model call on all of x.
_NOT_PLAIN = ("area", "mask", "strength", "hooks", "control", "timestep_start", "timestep_end", "default", "gligen")


def plain_cond(cond: list) -> str | None:
    """Why `cond` is not a single plain row (None if it is)."""
    if len(cond) != 1:
        return f"{len(cond)} conditioning entries"
    extra = [k for k in _NOT_PLAIN if cond[0].get(k) is not None and not (k == "strength" and cond[0][k] == 1.0)]
    return f"conditioning with {', '.join(extra)}" if extra else None


def host_state_reason(model, model_options: dict) -> str | None:
    """Why the host's calc_cond_batch does more per step than the one model call it makes (None if
    it does not): wrappers of the whole call, per-step callbacks, hooks that swap weights."""
    import comfy.patcher_extension as ext

    if "model_function_wrapper" in model_options:
        return "a model_function_wrapper is set"
    if model_options.get("multigpu_clones"):
        return "the rows are spread over several GPUs"  # newer ComfyUI's multi-GPU cond batching
    if ext.get_all_wrappers(ext.WrappersMP.CALC_COND_BATCH, model_options, is_model_options=True):
        return "a calc_cond_batch wrapper is set"
    patcher = getattr(model, "current_patcher", None)
    if patcher is not None:
        if patcher.get_all_callbacks(ext.CallbacksMP.ON_PREPARE_STATE):
            return "per-step model callbacks are set"
        if getattr(patcher, "hook_patches", None) or getattr(patcher, "forced_hooks", None) is not None:
            return "hook weight patches are registered"
    return None


def graph_reason(model, kwargs: dict, host_streamed: bool = False) -> str | None:
    """Why the recorded call cannot be a CUDA graph (None if it can): Python code inside the
    forward that may act differently per step, weights not at fixed addresses, or a forward that
    streamed its blocks in itself when it was recorded (`host_streamed`: dynamic_vram.streamed_since)."""
    reason = host_flag_reason()
    if reason:
        return reason
    if host_streamed:
        return "the host streams this model's blocks in itself (its block prefetch or model compiler)"
    options = kwargs.get("transformer_options", {})
    for key in ("patches", "patches_replace"):
        if any(options.get(key, {}).values()):
            return f"model {key.replace('_', ' ')} are set"
    # The host's compile wrapper only swaps the compiled module in for the call, the same every
    # step, so the call can be a CUDA graph (compiled in the host's call of the first step, before
    # the capture) if inductor made no CUDA graphs of its own (the "cudagraphs" backend, the
    # "reduce-overhead" / "max-autotune" modes: graphs that cannot be captured inside ours).
    wrappers = {key for kind in options.get("wrappers", {}).values() for key, fns in kind.items() if fns}
    if wrappers - {HOST_COMPILE_KEY}:
        return "model wrappers are set"
    patcher = getattr(model, "current_patcher", None)
    if wrappers:
        compile_kwargs = getattr(patcher, "model_options", {}).get(HOST_COMPILE_KWARGS) or {}
        backend, compile_mode = compile_kwargs.get("backend"), compile_kwargs.get("mode")
        if backend != "inductor" or compile_mode not in (None, "default", "max-autotune-no-cudagraphs"):
            return f"torch.compile with backend {backend!r}, mode {compile_mode!r} (may make CUDA graphs of its own)"
    if dynamic_vram.is_dynamic(model):  # newer ComfyUI, e.g. 0.33 on NVIDIA: weights in slots, checked per replay
        return dynamic_vram.graph_reason(model)
    for m in model.modules():
        if getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
            return "weights cast or patched inside the forward"  # low VRAM, hooks
    if not all(p.device.type == "cuda" for p in model.parameters()):
        return "weights not on the GPU"
    return None

