"""lora_hooks/: the one LoRA mechanism of both runtimes. A fixed LoRA added within a call (sampling), to
some rows only; trainable adapters on the targeted layers (training), under autocast with one cast
of a shared input and the up-projection inside its matmul; ComfyUI's file format and merge."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support.standins import CONTEXT, OpsLinear, tiny_unet
from lora_hooks import (DEFAULT_TARGETS, LoRAAdapter, LoraBranch, RowsMismatch, inject_lora, load_lora, lora_applied,
                  lora_state_dict, merged_weight)

x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
t = torch.tensor([10.0, 900.0])


def _out(unet):
    return unet(x, t, context=CONTEXT.expand(2, -1, -1))


def _randomise_up(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in network.adapters:
            a.lora_up.weight.copy_(torch.randn(a.lora_up.weight.shape, generator=g) * 0.1)


# --- a fixed LoRA within one call (sampling: a LoRA domain on the base's own modules) ---------------

def test_a_fixed_lora_is_added_inside_the_call_only():
    lin = nn.Linear(8, 6)
    up, down = torch.randn(6, 2), torch.randn(2, 8)
    b = LoraBranch(lin, down, up, 2.0)
    inp = torch.randn(3, 8)
    with lora_applied([b], {}):
        y = lin(inp)
    assert torch.allclose(y, F.linear(inp, merged_weight(lin.weight, down, up, 4.0), lin.bias), atol=1e-5)  # scale = alpha / rank
    assert torch.equal(lin(inp), F.linear(inp, lin.weight, lin.bias))  # hooks removed on exit


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 1), nn.Conv2d(6, 10, 3, padding=1), nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2)],
                         ids=["conv1x1", "conv3x3", "conv3x3-stride2-dilation2"])
def test_a_fixed_conv_lora_takes_the_base_geometry_and_is_its_merged_weight(conv):
    down, up = torch.randn(3, 6, *conv.kernel_size), torch.randn(10, 3, 1, 1)
    inp = torch.randn(2, 6, 9, 9)
    with lora_applied([LoraBranch(conv, down, up, 0.5)], {}):
        y = conv(inp)
    assert torch.allclose(y, conv._conv_forward(inp, merged_weight(conv.weight, down, up, 1.5), conv.bias), atol=1e-5)


def test_a_fixed_lora_is_cast_to_the_input_once_per_device_and_dtype():
    lin = nn.Linear(8, 6)
    b = LoraBranch(lin, torch.randn(2, 8).half(), torch.randn(6, 2).half(), 1.0)
    cache = {}
    with lora_applied([b], cache):
        y = lin(torch.ones(3, 8))
        lin(torch.ones(3, 8))
    assert list(cache) == [(id(b), torch.device("cpu"), torch.float32)] and y.dtype == torch.float32
    down, up = cache[(id(b), torch.device("cpu"), torch.float32)]
    assert down.dtype == up.dtype == torch.float32 and torch.equal(down, b.down.float())


def test_in_a_batched_call_a_fixed_lora_acts_on_its_rows_only():
    """A LoRA domain's rows riding in the base's call (nodes/sampling/lora_rows_in_base_call.py): the
    LoRA acts on those rows only, and a module that sees another batch than the call's raises
    RowsMismatch (the caller then makes the calls separately)."""
    lin = nn.Linear(8, 6)
    up, down = torch.randn(6, 2), torch.randn(2, 8)
    inp = torch.randn(3, 8)
    with lora_applied([LoraBranch(lin, down, up, 2.0)], {}, rows=(2, 1), batch=3):
        y = lin(inp)
        with pytest.raises(RowsMismatch, match="batch of 2, the call has 3 rows"):
            lin(inp[:2])
    assert torch.equal(y[:2], F.linear(inp[:2], lin.weight, lin.bias))
    assert torch.allclose(y[2:], F.linear(inp[2:], merged_weight(lin.weight, down, up, 4.0), lin.bias), atol=1e-5)


# --- trainable adapters (training) -------------------------------------------------------------------

def test_default_targets_adapt_attention_projections_and_feed_forward():
    unet = tiny_unet()
    network = inject_lora(unet, rank=4, alpha=4.0)
    assert network.paths == ["proj_in", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0", "ff.net.2", "proj_out"]
    assert DEFAULT_TARGETS == ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.*")


def test_a_fresh_adapter_changes_nothing_and_the_base_is_frozen():
    unet = tiny_unet()
    before = _out(unet)
    network = inject_lora(unet, rank=4, alpha=8.0)
    assert torch.allclose(_out(unet), before, rtol=0, atol=1e-6)  # up starts at zero (frozen weights pick other kernels)
    assert not any(p.requires_grad for p in unet.parameters())
    assert all(p.requires_grad for p in network.named_params().values())
    _out(unet).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(a.lora_up.weight.grad is not None for a in network.adapters)


def test_subclassed_layers_are_wrapped_in_place_keeping_class_attributes_and_keys():
    unet = tiny_unet()
    keys = list(unet.state_dict())
    layer = unet.to_q
    inject_lora(unet, rank=2, alpha=2.0)
    assert unet.to_q is layer and type(unet.to_q) is OpsLinear and unet.to_q.weight_function == []
    assert list(unet.state_dict()) == keys


def test_remove_gives_the_unet_back_as_it_was():
    unet = tiny_unet()
    before = _out(unet)
    network = inject_lora(unet, rank=4, alpha=4.0)
    _randomise_up(network)
    assert not torch.allclose(_out(unet), before)
    network.remove()
    assert torch.equal(_out(unet), before)
    assert all(p.requires_grad for p in unet.parameters())


def test_suspended_adapters_leave_the_base_alone_and_come_back_as_they_were():
    """Within suspended() the UNet computes exactly as without the adapters, also under autocast (no
    shared cast either); after it, also after an error, the adapters act again and nothing else changed."""
    unet = tiny_unet().requires_grad_(False)  # frozen as attach freezes it (the CPU's kernels differ by the flag)
    before = _out(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before_autocast = _out(unet)
    network = inject_lora(unet, rank=4, alpha=4.0)
    _randomise_up(network)
    adapted = _out(unet)
    flags = [p.requires_grad for p in unet.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with network.suspended():
            assert torch.equal(_out(unet), before)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(_out(unet), before_autocast)
            raise RuntimeError("inside the block")
    assert torch.equal(_out(unet), adapted) and network.enabled
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert all(p.requires_grad for p in network.parameters())


def test_export_keys_are_comfyuis_lora_format():
    unet = tiny_unet()
    network = inject_lora(unet, rank=4, alpha=2.0)
    sd = lora_state_dict(network)
    assert set(sd) == {f"diffusion_model.{p}.{s}" for p in network.paths for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert sd["diffusion_model.to_k.lora_down.weight"].shape == (4, 8)  # [rank, in]
    assert sd["diffusion_model.to_k.lora_up.weight"].shape == (16, 4)  # [out, rank]
    assert sd["diffusion_model.proj_in.lora_down.weight"].shape == (4, 16, 1, 1)
    assert sd["diffusion_model.proj_in.lora_up.weight"].shape == (16, 4, 1, 1)
    assert float(sd["diffusion_model.to_q.alpha"]) == 2.0
    # ComfyUI's LoraLoader maps diffusion_model.<path> to the UNet's <path>.weight
    assert all(k[len("diffusion_model."):].rsplit(".", 2)[0] + ".weight" in unet.state_dict() for k in sd if k.endswith(".lora_up.weight"))


@pytest.mark.parametrize("layer", [
    nn.Linear(12, 20),
    OpsLinear(12, 20),
    nn.Conv2d(6, 10, 1),
    nn.Conv2d(6, 10, 3, padding=1),
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
], ids=["linear", "ops-linear", "conv1x1", "conv3x3", "conv3x3-stride2"])
def test_merged_weight_matches_the_adapted_layer(layer):
    host = nn.Module()
    host.proj_in = layer
    network = inject_lora(host, rank=3, alpha=1.5, targets=("proj_in",))
    _randomise_up(network, seed=3)
    sd = lora_state_dict(network)
    w = merged_weight(layer.weight, sd["diffusion_model.proj_in.lora_down.weight"],
                      sd["diffusion_model.proj_in.lora_up.weight"], float(sd["diffusion_model.proj_in.alpha"]))
    if isinstance(layer, nn.Linear):
        inp = torch.randn(5, 12)
        expected = F.linear(inp, w, layer.bias)
    else:
        inp = torch.randn(2, 6, 9, 9)
        expected = F.conv2d(inp, w, layer.bias, layer.stride, layer.padding)
    assert torch.allclose(host.proj_in(inp), expected, atol=1e-5)


def test_a_lora_file_loads_back_into_fresh_adapters():
    a = inject_lora(tiny_unet(), rank=4, alpha=4.0, seed=1)
    _randomise_up(a)
    unet = tiny_unet()
    b = inject_lora(unet, rank=4, alpha=4.0, seed=2)
    load_lora(b, lora_state_dict(a))
    for k, v in lora_state_dict(a).items():
        assert torch.equal(lora_state_dict(b)[k], v)


def test_a_lora_of_another_rank_or_alpha_is_refused_naming_the_key():
    a = lora_state_dict(inject_lora(tiny_unet(), rank=4, alpha=4.0))
    b = inject_lora(tiny_unet(), rank=8, alpha=4.0)
    with pytest.raises(ValueError, match=r"proj_in.lora_down.weight has shape \[4, 16, 1, 1\], the adapter needs \[8, 16, 1, 1\]"):
        load_lora(b, a)
    c = inject_lora(tiny_unet(), rank=4, alpha=2.0)
    with pytest.raises(ValueError, match=r"alpha is 4.0, the adapters use alpha 2.0"):
        load_lora(c, a)
    with pytest.raises(ValueError, match="missing keys"):
        load_lora(c, {k: v for k, v in a.items() if "to_q" not in k})


def test_initial_adapters_depend_only_on_the_seed():
    a = lora_state_dict(inject_lora(tiny_unet(), rank=4, alpha=4.0, seed=7))
    torch.manual_seed(999)  # the global RNG plays no part
    b = lora_state_dict(inject_lora(tiny_unet(), rank=4, alpha=4.0, seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_targets_matching_nothing_are_an_error_naming_them():
    with pytest.raises(ValueError, match=r"LoRA targets \['attn9.to_x'\] match no Linear or Conv2d"):
        inject_lora(tiny_unet(), rank=4, alpha=4.0, targets=("attn9.to_x",))


def test_under_autocast_an_adapter_makes_no_copy_of_its_input_and_no_pass_over_its_output():
    """The adapter is memory traffic on top of the base layer (issue 16: LoRA training slower than
    full): under autocast it feeds the input to its first matmul as it is (no float32 copy first)
    and scales the rank-r tensor, so the only layer-sized tensor it makes is the second matmul's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.append((str(func.overloadpacket.__name__), tuple(out.shape), out.dtype))
            return out

    adapter = LoRAAdapter(nn.Linear(64, 32), rank=4, alpha=4.0)
    x = torch.randn(16, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), Record():
        y = adapter(x)
    assert y.shape == (16, 32) and y.dtype == torch.bfloat16
    assert not [m for m in made if m[1] == (16, 64) and m[2] == torch.float32]  # no float32 copy of the input
    layer_sized = [m for m in made if m[1] == (16, 32)]
    assert len(layer_sized) == 1 and layer_sized[0][0] in ("mm", "addmm", "linear"), made
    assert torch.allclose(y.float(), adapter.scale * adapter.lora_up(adapter.lora_down(x.float())), rtol=2e-2, atol=1e-3)


class _SelfAttentionProjections(nn.Module):
    """q, k and v of a self-attention: three layers handed the same tensor."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x):
        return self.to_q(x) * self.to_k(x) + self.to_v(x)


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, shape):
        super().__init__()
        self.shape, self.casts = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._to_copy and tuple(args[0].shape) == self.shape:
            self.casts += 1
        return out


def test_under_autocast_layers_handed_the_same_float32_tensor_cast_it_once():
    """Each of the six matmuls (three layers, three adapters) would cast the input on its own."""
    block = _SelfAttentionProjections()
    network = inject_lora(block, rank=4, alpha=4.0)
    _randomise_up(network)
    leaf = torch.randn(3, 7, 12, requires_grad=True)
    with _CountCasts(leaf.shape) as counted, torch.autocast("cpu", torch.bfloat16):
        x = leaf * 2  # an activation (autocast keeps the casts of leaves that require gradients)
        y = block(x)
    assert counted.casts == 1 and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert leaf.grad is not None and all(p.grad is not None for p in network.named_params().values())


def test_under_autocast_a_tensor_changed_in_place_between_two_layers_is_cast_again():
    block = _SelfAttentionProjections()
    network = inject_lora(block, rank=4, alpha=4.0)
    _randomise_up(network)
    leaf = torch.randn(3, 7, 12, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        x = leaf * 1  # an activation; the first call's cast stays alive (saved for the backward)
        q_before = block.to_q(x)
        x.mul_(3.0)  # e.g. a residual added in place
        q_after = block.to_q(x)
        expected = block.to_q(x.clone())
    assert torch.equal(q_after, expected) and not torch.allclose(q_after.float(), q_before.float())


@pytest.mark.parametrize("layer", [nn.Linear(12, 20), nn.Conv2d(6, 10, 3, padding=1), nn.Linear(12, 20).half(),
                                   nn.Conv2d(6, 10, 3, padding=1).half()],
                         ids=["linear", "conv3x3", "fp16-linear", "fp16-conv3x3"])
def test_under_autocast_an_adapted_layer_is_its_merged_weight_in_bf16(layer):
    """The Linear adapter's up-projection adds inside its matmul (addmm); the result and the adapters'
    gradients are those of base(x) + scale * up(down(x)) within bf16's rounding. Also with fp16 base
    weights and no manual cast, as the host loads a UNet on a GPU (LoRA mode trains on it)."""
    holder = nn.Module()
    holder.proj_in = layer
    network = inject_lora(holder, rank=3, alpha=6.0, targets=("proj_in",))
    _randomise_up(network, seed=4)
    inp = torch.randn(5, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 9, 9)
    with torch.autocast("cpu", torch.bfloat16):
        got = holder.proj_in(inp)
    adapter = network.adapters[0]
    weight, bias = layer.weight.float(), layer.bias.float()
    expected = layer._conv_forward(inp, weight, bias) if isinstance(layer, nn.Conv2d) else F.linear(inp, weight, bias)
    expected = expected + adapter.scale * adapter.lora_up(adapter.lora_down(inp))
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2)
    got.float().sum().backward()
    grads = [p.grad.clone() for p in network.named_params().values()]
    for p in network.named_params().values():
        p.grad = None
    expected.sum().backward()
    for g, p in zip(grads, network.named_params().values()):
        assert torch.allclose(g, p.grad, rtol=3e-2, atol=3e-2 * p.grad.abs().max().item())
