"""A LoRA as a forward hook on a Linear or Conv2d.

A LoRA of a layer with weight W is the low-rank branch

    y = base(x) + scale * up(down(x)),   scale = alpha / rank

down: x @ down.T for a Linear; for a Conv2d the base's own convolution (its stride, padding,
padding mode and dilation) with down's kernel. up: x @ up.T, or a 1x1 convolution. It is the layer
with weight  W + scale * (up.flatten(1) @ down.flatten(1)).reshape(W.shape),  which is how
ComfyUI's LoraLoader merges `<key>.lora_up.weight`, `<key>.lora_down.weight` and `<key>.alpha`
(files.py: the file format and that merge).

The base layer is never replaced nor its weight changed: it stays in place with its class,
attributes and state-dict keys (ComfyUI's ops classes subclass nn.Linear / nn.Conv2d and carry
their own), and a forward hook adds the branch to its output (hooks.py: `branch` computes it, for
all uses). No second copy of the weights, no weight swap; removing the hooks gives the layer
back as it was.

Training's adapters (adapters.py: LoRAAdapter, LoRANetwork, inject_lora): down starts
Kaiming-uniform, up at zero, so a fresh adapter changes nothing; the hooks stay on for the run.
The scale multiplies the rank-r tensor (its gradient is then a rank-r pass, not a layer-sized
one). Under autocast two things keep the adapters' own cost down (issue 16's profile of LoRA
training): one cast of a layer's input for the layer and its adapter, and for the next adapted
layers handed the same tensor (q, k and v of a self-attention: SharedCast), where autocast
would cast it, and its gradient back, once per matmul; and a Linear adapter's up-projection
adds onto the layer's output inside its matmul (addmm), not as a separate pass over it.

Pure torch: nothing here imports ComfyUI, training/ or nodes/.
"""
from .adapters import DEFAULT_TARGETS, LoRAAdapter, LoRANetwork, inject_lora, matches_target
from .files import KEY_PREFIX, load_lora, lora_state_dict, merged_weight
from .hooks import SharedCast, adapter_hook, branch

__all__ = [
    "DEFAULT_TARGETS",
    "KEY_PREFIX",
    "LoRAAdapter",
    "LoRANetwork",
    "SharedCast",
    "adapter_hook",
    "branch",
    "inject_lora",
    "load_lora",
    "lora_state_dict",
    "matches_target",
    "merged_weight",
]
