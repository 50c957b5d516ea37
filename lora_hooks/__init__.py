"""A LoRA as a forward hook on a Linear or Conv2d: the one mechanism of sampling and training.

A LoRA of a layer with weight W is the low-rank branch

    y = base(x) + scale * up(down(x)),   scale = alpha / rank (times a strength when sampling)

down: x @ down.T for a Linear; for a Conv2d the base's own convolution (its stride, padding,
padding mode and dilation) with down's kernel. up: x @ up.T, or a 1x1 convolution. It is the layer
with weight  W + scale * (up.flatten(1) @ down.flatten(1)).reshape(W.shape),  which is how
ComfyUI's LoraLoader merges `<key>.lora_up.weight`, `<key>.lora_down.weight` and `<key>.alpha`
(files.py: the file format and that merge; extract.py: such a file from the difference of a
full copy and its base, by truncated SVD).

The base layer is never replaced nor its weight changed: it stays in place with its class,
attributes and state-dict keys (ComfyUI's ops classes subclass nn.Linear / nn.Conv2d and carry
their own), and a forward hook adds the branch to its output (hooks.py: `branch` computes it, for
both runtimes). No second copy of the weights, no weight swap; removing the hooks gives the layer
back as it was. The two runtimes add it two ways:

- sampling, a fixed LoRA (the tensors of a LoRA file as the host holds them, LoraBranch): hooks
  that exist only inside one model call (`lora_applied`), the tensors cast once per device and
  dtype (a cache the caller keeps), the scale applied in the add. With `rows` the branch goes to
  some rows of a batched call only (a LoRA domain's rows riding in the base's call); a layer that
  sees another batch than the call's raises RowsMismatch, and the caller makes separate calls.
- training, trainable adapters (adapters.py: LoRAAdapter, LoRANetwork, inject_lora): down starts
  Kaiming-uniform, up at zero, so a fresh adapter changes nothing; the hooks stay on for the run.
  The scale multiplies the rank-r tensor (its gradient is then a rank-r pass, not a layer-sized
  one). Under autocast two things keep the adapters' own cost down (issue 16's profile of LoRA
  training): one cast of a layer's input for the layer and its adapter, and for the next adapted
  layers handed the same tensor (q, k and v of a self-attention: SharedCast), where autocast
  would cast it, and its gradient back, once per matmul; and a Linear adapter's up-projection
  adds onto the layer's output inside its matmul (addmm), not as a separate pass over it.

Pure torch: nothing here imports ComfyUI, training/ or nodes/. Named lora_hooks, not lora: in a
process running the host, ComfyUI's nodes.py puts comfy/ on sys.path, where comfy/lora.py is a
top-level `lora` (tests, tools and experiments import this package by its top-level name).
"""
from .adapters import DEFAULT_TARGETS, LoRAAdapter, LoRANetwork, inject_lora, matches_target
from .extract import Extraction, extract_lora, low_rank
from .files import KEY_PREFIX, load_lora, lora_state_dict, merged_weight
from .hooks import LoraBranch, RowsMismatch, SharedCast, adapter_hook, branch, lora_applied

__all__ = [
    "DEFAULT_TARGETS",
    "Extraction",
    "KEY_PREFIX",
    "LoRAAdapter",
    "LoRANetwork",
    "LoraBranch",
    "RowsMismatch",
    "SharedCast",
    "adapter_hook",
    "branch",
    "extract_lora",
    "inject_lora",
    "load_lora",
    "lora_applied",
    "lora_state_dict",
    "low_rank",
    "matches_target",
    "merged_weight",
]
