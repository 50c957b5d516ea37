"""The fast path (nodes/sampling/fastpath.py) gives what the straightforward guider gives.

Each case samples the same graph twice in the real host: with the fast path (the default: the
domain rows and the base rows each recorded once, then called directly) and with
INDOMAIN_FAST_DOMAIN=0 (every row through the host's calc_cond_batch each step, a LoRA domain as
a weight hook of the base). The recorded call is made directly on the CPU and replayed as a CUDA
graph on the GPU (the GPU tier, --gpu): the logs below name it "recorded" for either.
"""
import importlib
import logging
import os

import pytest
import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image
from tests.support.host import HostError


@pytest.fixture(scope="module")
def files(comfy):
    d = comfy.model_dir("domain_unets")
    sd = tiny.unet_state_dict(0)
    attention = tiny.lora_state_dict(seed=5)
    # A LoRA on the 1x1 convolutions too (SD1's proj_in / proj_out), as Train Domain UNet makes them.
    g = torch.Generator().manual_seed(6)
    conv = dict(attention)
    for key, w in sd.items():
        if key.endswith((".proj_in.weight", ".proj_out.weight")) and w.ndim == 4:
            prefix = "diffusion_model." + key[: -len(".weight")]
            conv[prefix + ".lora_down.weight"] = torch.randn(4, w.shape[1], 1, 1, generator=g) / w.shape[1] ** 0.5
            conv[prefix + ".lora_up.weight"] = torch.randn(w.shape[0], 4, 1, 1, generator=g) * 0.5
            conv[prefix + ".alpha"] = torch.tensor(2.0)
    # A LoHa on one projection: not a plain LoRA, so the whole domain keeps the weight-hook path.
    loha = dict(attention)
    key = next(k for k in sd if k.endswith(".attn1.to_q.weight"))
    prefix = "diffusion_model." + key[: -len(".weight")]
    out_f, in_f = sd[key].shape
    for name, shape in (("hada_w1_a", (out_f, 2)), ("hada_w1_b", (2, in_f)), ("hada_w2_a", (out_f, 2)), ("hada_w2_b", (2, in_f))):
        loha[f"{prefix}.{name}"] = torch.randn(*shape, generator=g) * 0.2
    loha[prefix + ".alpha"] = torch.tensor(2.0)
    for k in [k for k in loha if k.startswith(prefix + ".lora_")]:
        del loha[k]
    named = {"domain": tiny.domain_state_dict(), "lora": attention, "conv_lora": conv, "loha": loha}
    return {n: os.path.basename(tiny.write_safetensors(os.path.join(d, f"fast_{n}.safetensors"), v)) for n, v in named.items()}


def sample(comfy, monkeypatch, fast: bool, caplog=None, *, steps=2, sample_inputs=None, **kw):
    """The LATENT of text_to_image(**kw), the fast path on or off; sample_inputs: inputs of the
    sampler node to change (e.g. its model)."""
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "1" if fast else "0")
    if caplog is not None:
        caplog.clear()
    p = text_to_image(steps=steps, **kw)
    p["sample"]["inputs"].update(sample_inputs or {})
    return comfy.run(p)["captured"]["out"]["samples"]


RECORDED = {False: "(direct", True: "(graph"}  # how the device makes a recorded call, by the `graphs` fixture


@pytest.fixture(autouse=True)
def device_path(graphs):
    global RECORDED_HERE
    RECORDED_HERE = RECORDED[graphs]


def fast_paths(caplog) -> list[str]:
    """The fast path's log lines, the device's way of making a recorded call named "(recorded"."""
    lines = [r.getMessage() for r in caplog.records if "fast path" in r.getMessage() or "straightforward path" in r.getMessage()]
    return [line.replace(RECORDED_HERE, "(recorded") for line in lines]


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO)


def test_full_copy_domain_fast_equals_straightforward(comfy, files, monkeypatch, caplog):
    kw = dict(domain=["dom", 0], domain_scale=2.0, extra={"dom": loader(files["domain"])})
    slow = sample(comfy, monkeypatch, False, caplog, **kw)
    assert fast_paths(caplog) == []
    fast = sample(comfy, monkeypatch, True, caplog, **kw)
    assert fast_paths(caplog) == ["domain 'domain_model': fast path (recorded)", "base model (3 rows): fast path (recorded)"]
    assert torch.equal(fast, slow)  # the same model calls with the same inputs: bit for bit


@pytest.mark.parametrize("batch,end,negative", [(2, 0.5, "blurry"), (1, 1.0, "")])
def test_fast_path_with_batches_intervals_and_an_empty_negative(comfy, files, monkeypatch, caplog, batch, end, negative):
    extra = {"dom": loader(files["domain"]), "lora": loader(files["lora"]),
             "t1": {"class_type": "InDomainTerm", "inputs": {"domain_model": ["lora", 0], "weight": 0.7,
                                                             "start_percent": 0.0, "end_percent": end}}}

    kw = dict(steps=3, batch=batch, negative=negative, domain=["dom", 0], domain_scale=1.5, extra=extra,
              sample_inputs={"more_domains": ["t1", 0]})
    slow = sample(comfy, monkeypatch, False, caplog, **kw)
    fast = sample(comfy, monkeypatch, True, caplog, **kw)
    assert fast.shape[0] == batch and torch.isfinite(fast).all()
    assert close(fast, slow, rel=1e-4)
    base = sorted(m for m in fast_paths(caplog) if m.startswith("base model"))
    if end < 1.0:  # the LoRA term's interval ends mid-run: the null row is still needed by the other domain
        assert base == ["base model (3 rows): fast path (recorded)"]
    else:  # an empty negative is the null row: one base row fewer
        assert base == ["base model (2 rows): fast path (recorded)"]


@pytest.mark.parametrize("name", ["lora", "conv_lora"])
def test_lora_domain_as_adapters_equals_the_weight_hook(comfy, files, monkeypatch, caplog, name):
    kw = dict(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files[name])})
    hooked = sample(comfy, monkeypatch, False, caplog, **kw)
    adapters = sample(comfy, monkeypatch, True, caplog, **kw)
    assert fast_paths(caplog) == ["domain 'domain_model': fast path (recorded, LoRA as adapters)",
                                  "base model (3 rows): fast path (recorded)"]
    assert close(adapters, hooked, rel=1e-4)  # unmerged x@W + (x@down)@up against merged weights
    base = tiny.tiny_model().model.diffusion_model.state_dict()
    assert all(torch.equal(base[k].cpu(), v.to(base[k].dtype)) for k, v in tiny.unet_state_dict(0).items())  # untouched


@pytest.mark.parametrize("negative", ["blurry", ""])
def test_without_graphs_a_lora_domain_rides_in_the_base_call(comfy, files, monkeypatch, caplog, negative, graphs, on_gpu):
    """Without CUDA graphs (the CPU; on a GPU INDOMAIN_FAST_DOMAIN=eager) every model call costs
    its launches on the CPU: after the first step the LoRA domain's row rides in the base's call
    (nodes/sampling/lora_rows_in_base_call.py), the LoRA added to that row only. One call per step
    instead of two, and the latents of the separate calls."""
    model_base = importlib.import_module("comfy.model_base")
    calls, real = [], model_base.BaseModel.apply_model

    def counted(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(model_base.BaseModel, "apply_model", counted)
    kw = dict(steps=4, negative=negative, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["conv_lora"])})
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "separate")
    caplog.clear()
    separate = comfy.run(text_to_image(**kw))["captured"]["out"]["samples"]
    separate_calls, calls[:] = list(calls), []
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "eager" if graphs else "1")  # where graphs are made: without them
    caplog.clear()
    joint = comfy.run(text_to_image(**kw))["captured"]["out"]["samples"]
    base_rows = 3 if negative else 2
    assert separate_calls == [1, base_rows] * 4  # the domain row first
    assert calls == [1, base_rows] + [base_rows + 1] * 3  # the first step records both calls
    assert "base model: the rows of domain 'domain_model' in the base's call" in caplog.text
    assert close(joint, separate, rel=1e-3 if on_gpu else 1e-5)  # the same math; a larger batch may take other kernels
    hooked = sample(comfy, monkeypatch, False, caplog, **kw)
    assert close(joint, hooked, rel=1e-4)


def test_two_lora_domains_and_a_batch_of_two_ride_in_one_call(comfy, files, monkeypatch, caplog, graphs, on_gpu):
    """Each LoRA acts on its own domain's rows only: two LoRA domains, two images, one call of
    (3 + 2) x 2 rows per step after the first, the latents of the separate calls."""
    extra = {"a": loader(files["lora"]), "b": loader(files["conv_lora"]),
             "t": {"class_type": "InDomainTerm", "inputs": {"domain_model": ["b", 0], "weight": 0.7,
                                                            "start_percent": 0.0, "end_percent": 1.0}}}
    kw = dict(steps=3, batch=2, domain=["a", 0], domain_scale=1.5, extra=extra)
    p = text_to_image(**kw)
    p["sample"]["inputs"]["more_domains"] = ["t", 0]
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "separate")
    separate = comfy.run(p)["captured"]["out"]["samples"]
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "eager" if graphs else "1")
    caplog.clear()
    joint = comfy.run(p)["captured"]["out"]["samples"]
    assert "base model: the rows of domain 'domain_model', domain 'term0' in the base's call" in caplog.text
    assert close(joint, separate, rel=1e-3 if on_gpu else 1e-5)


def test_a_lora_domain_whose_conditioning_does_not_concatenate_keeps_its_own_call(comfy, files, monkeypatch, caplog, graphs):
    """A prompt of more than 77 tokens: the host pads the base's rows to its length, the domain's
    empty prompt stays 77 tokens, so the rows cannot share a call (made without CUDA graphs only):
    separate calls, the same latents."""
    kw = dict(steps=3, positive=", ".join(["a photo of a cat on a sunny windowsill"] * 12), domain=["dom", 0],
              domain_scale=1.5, extra={"dom": loader(files["lora"])})
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "separate")
    separate = comfy.run(text_to_image(**kw))["captured"]["out"]["samples"]
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "eager" if graphs else "1")
    caplog.clear()
    joint = comfy.run(text_to_image(**kw))["captured"]["out"]["samples"]
    assert "base model: the rows of domain 'domain_model' in calls of their own (conditioning that does not concatenate)" in caplog.text
    assert torch.equal(joint, separate)


def test_a_compiled_model_keeps_the_lora_domain_as_a_weight_hook(comfy, files, monkeypatch, caplog):
    """Dynamo does not guard on module hooks: a graph it traced without the adapters would be reused
    with the LoRA silently dropped. Here a plain KSampler at cfg 1 (one row, like the domain's call)
    traces the compiled UNet first; the LoRA domain must still act."""
    from torch import _dynamo

    real_compile = torch.compile
    # The host's TorchCompileModel node, with dynamo's eager backend (the same tracing and guards
    # without inductor's minutes of C++ compilation on a CPU).
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: real_compile(*a, **{**kw, "backend": "eager"}))
    _dynamo.reset()
    compiled = {"class_type": "TorchCompileModel", "inputs": {"model": ["ckpt", 0], "backend": "inductor"}}

    graph = dict(extra={"compiled": compiled, "dom": loader(files["lora"], base=("compiled", 0))},
                 sample_inputs={"model": ["compiled", 0]})
    try:
        try:
            sample(comfy, monkeypatch, True, caplog, sampler="KSampler", cfg=1.0, **graph)
        except HostError as e:
            if comfy.dynamic_vram and "same dtype" in str(e):  # the host's own KSampler, before any of ours
                pytest.xfail("ComfyUI 0.33's own KSampler fails on a compiled model under dynamic VRAM when "
                             f"the file's dtype is not the model's (fp32 file, fp16 model): {str(e)[-160:]}")
            raise
        without = sample(comfy, monkeypatch, True, caplog, domain=["dom", 0], domain_scale=0.0, **graph)
        hooked = sample(comfy, monkeypatch, False, caplog, domain=["dom", 0], domain_scale=1.5, **graph)
        fast = sample(comfy, monkeypatch, True, caplog, domain=["dom", 0], domain_scale=1.5, **graph)
        messages = [r.getMessage() for r in caplog.records]
    finally:
        _dynamo.reset()
    assert "domain 'domain_model': LoRA kept as a weight hook (the model is compiled (torch.compile wrapper))" in messages
    assert not close(hooked, without, rel=1e-2)  # the LoRA acts on this model
    assert close(fast, hooked, rel=1e-4)


def test_a_lora_that_is_not_plain_keeps_the_weight_hook(comfy, files, monkeypatch, caplog):
    kw = dict(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["loha"])})
    slow = sample(comfy, monkeypatch, False, caplog, **kw)
    fast = sample(comfy, monkeypatch, True, caplog, **kw)
    # No adapter path: the domain rides in the base's call as a weight hook, so neither is recorded.
    assert fast_paths(caplog) == []
    assert torch.equal(fast, slow)


def test_control_in_domain_takes_the_straightforward_path(comfy, files, monkeypatch, caplog):
    cn = os.path.join(comfy.model_dir("controlnet"), "fast_cn.safetensors")
    tiny.write_safetensors(cn, tiny.controlnet_state_dict())
    extra = {"dom": loader(files["domain"]),
             "cn": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "fast_cn.safetensors"}},
             "hint": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x8040c0}},
             "apply": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                 "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0], "image": ["hint", 0],
                 "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}}

    kw = dict(domain=["dom", 0], domain_scale=1.5, extra=extra,
              sample_inputs=dict(positive=["apply", 0], negative=["apply", 1], control_in_domain=True))
    slow = sample(comfy, monkeypatch, False, caplog, **kw)
    fast = sample(comfy, monkeypatch, True, caplog, **kw)
    assert fast_paths(caplog) == ["domain 'domain_model': straightforward path (conditioning with control)",
                                  "base model (3 rows): straightforward path (conditioning with control)"]
    assert torch.equal(fast, slow)


def test_lora_branches_refuse_what_is_not_a_plain_lora(comfy):
    """The host's weight patches read as lora_hooks/' branches (lora_hooks/ adds them: tests/test_lora_hooks.py)."""
    adapters = comfy.pack("nodes.sampling.lora_adapters")
    lora_hooks = comfy.pack("lora_hooks")
    from comfy.weight_adapter.lora import LoRAAdapter

    lin = torch.nn.Linear(8, 6)
    model = torch.nn.Module()
    model.lin = lin
    up, down = torch.randn(6, 2), torch.randn(2, 8)
    plain = (1.0, LoRAAdapter(set(), (up, down, torch.tensor(4.0), None, None, None)), 1.0, None, None)
    [b] = adapters.lora_branches(model, {"lin.weight": [plain]})
    assert b.module is lin and b.scale == 2.0  # strength * alpha / rank
    x = torch.randn(3, 8)
    with lora_hooks.lora_applied([b], {}):
        y = lin(x)
    assert torch.allclose(y, x @ (lin.weight + 2.0 * up @ down).T + lin.bias, atol=1e-5)
    dora = (1.0, LoRAAdapter(set(), (up, down, None, None, torch.ones(6, 1), None)), 1.0, None, None)
    offset = (1.0, plain[1], 1.0, (0, 0, 3), None)
    weak_model = (1.0, plain[1], 0.5, None, None)
    for bad in (dora, offset, weak_model):
        assert adapters.lora_branches(model, {"lin.weight": [bad]}) is None
    assert adapters.lora_branches(model, {"lin.bias": [plain]}) is None
    assert adapters.lora_branches(model, {"missing.weight": [plain]}) is None


@pytest.mark.parametrize("mode", ["1", "eager", "domain"])
def test_domain_scale_zero_is_the_stock_ksampler_bit_for_bit(comfy, files, monkeypatch, caplog, mode):
    """With no domain term on, each step is the host's own sampling_function: nothing is recorded."""
    import comfy.model_management as mm

    mm.unload_all_models()  # then the loaded models are this test's
    # The stock run just before ours: on a GPU the first run after loading can differ in the last bits.
    for _ in range(2):
        stock = comfy.run(text_to_image(sampler="KSampler", steps=3))["captured"]["out"]["samples"]
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", mode)
    caplog.clear()
    ours = comfy.run(text_to_image(steps=3, domain=["dom", 0], domain_scale=0.0,
                                   extra={"dom": loader(files["domain"])}))["captured"]["out"]["samples"]
    assert torch.equal(ours, stock)
    from comfy import model_base

    unets = [m for m in mm.current_loaded_models if isinstance(m.model.model, model_base.BaseModel)]
    assert len(unets) == 1  # a domain of weight 0 is not even loaded
    assert fast_paths(caplog) == []


@pytest.mark.parametrize("patch", [
    # An attention patch recording the unconditional rows' attention, read back after cfg by a post-cfg
    # function that calls the model again.
    {"class_type": "SelfAttentionGuidance", "inputs": {"model": ["ckpt", 0], "scale": 0.8, "blur_sigma": 2.0}},
    # An attention replacement for the middle block, and a post-cfg function calling the model with it.
    {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["ckpt", 0], "scale": 3.0}},
], ids=["SelfAttentionGuidance", "PerturbedAttentionGuidance"])
def test_model_patches_sample_as_on_the_straightforward_path(comfy, files, monkeypatch, caplog, patch):
    extra = {"dom": loader(files["domain"]), "patched": patch}

    def run(fast, patched=True):
        return sample(comfy, monkeypatch, fast, steps=3, domain=["dom", 0], domain_scale=1.5, extra=extra,
                      sample_inputs={"model": ["patched", 0]} if patched else None)

    fast = run(True)
    assert torch.equal(fast, run(False))
    assert not torch.equal(fast, run(True, patched=False))  # the patch does act on this model


def test_a_base_model_patch_keeps_the_fast_path_but_no_cuda_graph(comfy, files, monkeypatch, caplog, on_gpu):
    """FreeU patches the base's forward with Python code: the recorded call runs it every step,
    but a CUDA graph (which would freeze what that code does) is refused."""
    fastpath = comfy.pack("nodes.sampling.fastpath")  # graph_reason as the recorder sees it
    seen = []
    real = fastpath.graph_reason
    monkeypatch.setattr(fastpath, "graph_reason", lambda *a: seen.append(real(*a)) or seen[-1])
    extra = {"dom": loader(files["domain"]),
             "freeu": {"class_type": "FreeU_V2", "inputs": {"model": ["ckpt", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}}}

    def run(fast, patched):
        return sample(comfy, monkeypatch, fast, domain=["dom", 0], domain_scale=1.5, extra=extra,
                      sample_inputs={"model": ["freeu", 0]} if patched else None)

    assert torch.equal(run(True, True), run(False, True))
    # On the CPU the weights decide anyway; what matters is which check refuses first.
    device = None if on_gpu else "weights not on the GPU"
    assert seen == [device, "model patches are set"]  # the domain's call, then the base's
    seen.clear()
    run(True, False)
    assert seen == [device, device]  # a plain run: nothing but the device


def test_a_forward_that_streams_its_blocks_itself_keeps_the_fast_path_but_no_cuda_graph(comfy, files, monkeypatch, on_gpu):
    """Under dynamic VRAM some forwards stream their blocks' weights in on a stream of their own
    (ComfyUI 0.33's block prefetch: LTX-2, MiniMax; newer hosts also record graphs of their own
    blocks): the recorded call is made directly every step, never captured around the host's
    copies and waits. Here the tiny UNet's forward makes its prefetch queue as those forwards do."""
    prefetch = pytest.importorskip("comfy.model_prefetch", reason="a host without block prefetch (before 0.33)")
    import comfy.model_management as mm
    from comfy.ldm.modules.diffusionmodules import openaimodel

    fastpath = comfy.pack("nodes.sampling.fastpath")
    seen = []
    real = fastpath.graph_reason
    monkeypatch.setattr(fastpath, "graph_reason", lambda *a: seen.append(real(*a)) or seen[-1])
    extra = {"dom": loader(files["domain"])}

    def run(fast):
        return sample(comfy, monkeypatch, fast, domain=["dom", 0], domain_scale=1.5, extra=extra)

    plain = run(True)
    device = None if on_gpu else "weights not on the GPU"
    assert seen == [device, device]  # the domain's call, then the base's
    seen.clear()
    forward = openaimodel.UNetModel.forward

    def streaming_forward(self, x, *args, transformer_options=None, **kwargs):
        # as LTX-2's forward starts (the host decides whether to stream: dynamic VRAM, a GPU, a second stream)
        transformer_options = {} if transformer_options is None else transformer_options
        prefetch.make_prefetch_queue([], torch.device("cuda", 0), {**transformer_options, "prefetch_dynamic_vbars": True})
        return forward(self, x, *args, transformer_options=transformer_options, **kwargs)

    monkeypatch.setattr(openaimodel.UNetModel, "forward", streaming_forward)
    monkeypatch.setattr(mm, "NUM_STREAMS", max(mm.NUM_STREAMS, 1))
    streamed = run(True)
    assert seen == ["the host streams this model's blocks in itself (its block prefetch or model compiler)"] * 2
    assert torch.equal(streamed, run(False))
    assert close(streamed, plain, rel=1e-3 if on_gpu else 0.0)  # (on a GPU, plain's rows were CUDA graphs)


def test_the_base_rows_fall_back_when_the_host_splits_them(comfy, files, monkeypatch, caplog):
    """Low memory makes the host run the rows in several calls: nothing recorded, same result."""
    from comfy import model_base

    kw = dict(domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["domain"])})
    monkeypatch.setattr(model_base.BaseModel, "memory_required", lambda self, shape, **kw: 1e30)  # no two rows fit
    slow = sample(comfy, monkeypatch, False, caplog, **kw)
    fast = sample(comfy, monkeypatch, True, caplog, **kw)
    assert torch.equal(fast, slow)
    assert "base model (3 rows): straightforward path (the host's call was not one model call on all rows (3 calls))" \
        in fast_paths(caplog)


def test_what_keeps_the_hosts_call_every_step(comfy):
    """Host state that makes calc_cond_batch more than its one model call is never recorded."""
    from comfy import hooks
    from comfy import patcher_extension as ext

    fastpath = comfy.pack("nodes.sampling.fastpath_rules")
    patcher = tiny.load_unet(tiny.unet_state_dict(0))  # a model of its own (tiny_model() is shared)
    model = patcher.model
    model.current_patcher = patcher  # as the host's pre_run sets it
    assert fastpath.host_state_reason(model, {}) is None
    assert fastpath.host_state_reason(model, {"model_function_wrapper": lambda f, a: f(a["input"], a["timestep"], **a["c"])}) \
        == "a model_function_wrapper is set"
    assert fastpath.host_state_reason(model, {"multigpu_clones": {"cuda:1": patcher}}) == "the rows are spread over several GPUs"
    options = {}
    ext.add_wrapper(ext.WrappersMP.CALC_COND_BATCH, lambda executor, *a, **k: executor(*a, **k), options, is_model_options=True)
    assert fastpath.host_state_reason(model, options) == "a calc_cond_batch wrapper is set"
    patcher.add_callback(ext.CallbacksMP.ON_PREPARE_STATE, lambda *a: None)
    assert fastpath.host_state_reason(model, {}) == "per-step model callbacks are set"
    patcher.callbacks.clear()
    patcher.hook_patches[hooks._HookRef()] = {"x.weight": []}
    assert fastpath.host_state_reason(model, {}) == "hook weight patches are registered"


def test_a_compiled_module_is_seen_whichever_way_it_was_compiled(comfy):
    """The LoRA adapters stay off a compiled UNet: compiled in place (nn.Module.compile), a block
    swapped for torch.compile's wrapper, or the host's compile wrapper on the MODEL."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    adapters = comfy.pack("nodes.sampling.lora_adapters")
    patcher = tiny.load_unet(tiny.unet_state_dict(0))
    unet = patcher.model.diffusion_model
    assert adapters.compiled_reason(patcher) is None
    unet.compile()
    assert adapters.compiled_reason(patcher) == "a module of the model is compiled"
    unet._compiled_call_impl = None
    block = unet.output_blocks[0]
    unet.output_blocks[0] = torch.compile(block)
    assert adapters.compiled_reason(patcher) == "a module of the model is compiled"
    unet.output_blocks[0] = block
    assert adapters.compiled_reason(patcher) is None
    clone = patcher.clone()
    set_torch_compile_wrapper(clone, backend="eager")
    assert adapters.compiled_reason(patcher, clone) == "the model is compiled (torch.compile wrapper)"
    del clone.model_options["torch_compile_kwargs"]  # the wrapper alone is seen too
    assert adapters.compiled_reason(patcher, clone) == "the model is compiled (torch.compile wrapper)"
    assert adapters.compiled_reason(patcher) is None  # the clone's options only
    # The host's compile wrapper (inductor, no CUDA graphs of its own) does not keep the recorded
    # call from being a CUDA graph (on the CPU the device does); its CUDA-graph backend and any
    # other model wrapper do.
    from comfy import patcher_extension as ext

    fastpath = comfy.pack("nodes.sampling.fastpath_rules")
    kwargs = {"transformer_options": {"wrappers": clone.wrappers}}  # as the host's sampling run passes them
    clone.model.current_patcher = clone  # as the host's pre_run sets it
    set_torch_compile_wrapper(clone, backend="inductor")
    assert fastpath.graph_reason(clone.model, kwargs).startswith("weights not on the GPU")  # (dynamic VRAM: no slots)
    set_torch_compile_wrapper(clone, backend="cudagraphs")
    assert fastpath.graph_reason(clone.model, kwargs) == \
        "torch.compile with backend 'cudagraphs', mode None (may make CUDA graphs of its own)"
    set_torch_compile_wrapper(clone, backend="inductor", mode="reduce-overhead")
    assert "may make CUDA graphs of its own" in fastpath.graph_reason(clone.model, kwargs)
    set_torch_compile_wrapper(clone, backend="inductor")
    clone.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, "another pack", lambda executor, *a, **k: executor(*a, **k))
    assert fastpath.graph_reason(clone.model, kwargs) == "model wrappers are set"


@pytest.mark.parametrize("sampler_name", ["heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "euler_cfg_pp"])
def test_the_host_samplers_give_the_same_latents_on_the_fast_path(comfy, files, monkeypatch, caplog, sampler_name):
    """Samplers that call the model twice per step, keep history, draw noise or read the
    unconditional prediction back (CFG++): the recorded calls change nothing."""
    kw = dict(domain=["dom", 0], domain_scale=1.5, sampler_name=sampler_name, extra={"dom": loader(files["domain"])})
    slow = sample(comfy, monkeypatch, False, caplog, **kw)
    fast = sample(comfy, monkeypatch, True, caplog, **kw)
    assert fast_paths(caplog) == ["domain 'domain_model': fast path (recorded)", "base model (3 rows): fast path (recorded)"]
    assert torch.equal(fast, slow)


class TestRowBatching:
    """A model patch that replaces the host's batching of the text rows (sampler_calc_cond_batch_function,
    as the host's SkipLayerGuidance nodes set it): here it also scales the negative's prediction."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"
    calls: list = []

    def patch(self, model):
        import comfy.samplers

        def rows(args):
            TestRowBatching.calls.append(len(args["conds"]))
            cond, uncond = args["conds"]  # exactly the host's two text rows, as SkipLayerGuidance unpacks them
            out = comfy.samplers.calc_cond_batch(args["model"], [cond, uncond], args["input"], args["sigma"], args["model_options"])
            return [out[0], out[1] * 0.9]

        m = model.clone()
        m.set_model_sampler_calc_cond_batch_function(rows)
        return (m,)


HOST_PATCHES = {
    "RescaleCFG": {"class_type": "RescaleCFG", "inputs": {"model": ["ckpt", 0], "multiplier": 0.7}},
    "FreeU_V2": {"class_type": "FreeU_V2", "inputs": {"model": ["ckpt", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
    "SelfAttentionGuidance": {"class_type": "SelfAttentionGuidance", "inputs": {"model": ["ckpt", 0], "scale": 0.8, "blur_sigma": 2.0}},
    "PerturbedAttentionGuidance": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["ckpt", 0], "scale": 3.0}},
    "SkipLayerGuidanceDiTSimple": {"class_type": "SkipLayerGuidanceDiTSimple", "inputs": {
        "model": ["ckpt", 0], "double_layers": "1", "single_layers": "1", "start_percent": 0.0, "end_percent": 1.0}},
    "row batching": {"class_type": "TestRowBatching", "inputs": {"model": ["ckpt", 0]}},
}


@pytest.fixture(scope="module")
def row_batching_node(comfy):
    import nodes
    nodes.NODE_CLASS_MAPPINGS["TestRowBatching"] = TestRowBatching


@pytest.mark.parametrize("patch", list(HOST_PATCHES))
def test_domain_weight_zero_is_ksampler_under_every_host_model_patch(comfy, files, monkeypatch, caplog, row_batching_node, patch):
    """Every domain weight 0: each step is the host's own sampling_function, so whatever a model
    patch does (guidance functions, attention patches, forward patches, its own row batching), the
    result is KSampler's, bit for bit."""
    extra = {"patched": HOST_PATCHES[patch], "dom": loader(files["domain"])}
    stock = sample(comfy, monkeypatch, True, caplog, steps=3, sampler="KSampler", extra=extra,
                   sample_inputs={"model": ["patched", 0]})
    for fast in (True, False):
        ours = sample(comfy, monkeypatch, fast, caplog, steps=3, domain=["dom", 0], domain_scale=0.0, extra=extra,
                      sample_inputs={"model": ["patched", 0]})
        assert torch.equal(ours, stock)


def test_a_patch_that_batches_the_text_rows_itself_keeps_doing_so_with_a_domain(comfy, files, monkeypatch, caplog, row_batching_node):
    """With a domain term on, the patch still gets exactly the two text rows each step (the empty
    prompt and the domain rows are computed beside it), and what it does to them stays in the result."""
    extra = {"patched": HOST_PATCHES["row batching"], "dom": loader(files["domain"])}
    TestRowBatching.calls.clear()
    patched = sample(comfy, monkeypatch, True, caplog, steps=3, domain=["dom", 0], domain_scale=1.5, extra=extra,
                     sample_inputs={"model": ["patched", 0]})
    assert TestRowBatching.calls == [2, 2, 2]
    straightforward = sample(comfy, monkeypatch, False, caplog, steps=3, domain=["dom", 0], domain_scale=1.5, extra=extra,
                             sample_inputs={"model": ["patched", 0]})
    assert torch.equal(patched, straightforward)
    plain = sample(comfy, monkeypatch, True, caplog, steps=3, domain=["dom", 0], domain_scale=1.5, extra={"dom": extra["dom"]})
    assert not close(patched, plain, rel=1e-3)


def test_a_record_serves_only_the_objects_and_weights_it_was_made_for(comfy):
    """Records are keyed by the ids of the step's options and rows, and hold them, so that no later
    object can take an id over; a CUDA graph is re-recorded when a weight or a buffer is replaced
    (not only when the captured one moved) and when the host patched the weights in place."""
    fastpath = comfy.pack("nodes.sampling.fastpath")
    options, rows = {"transformer_options": {}}, [[{"model_conds": {}}], None]
    rec = fastpath._Record((1, 4, 8, 8), options, rows)
    assert rec.holds(options, rows)
    assert not rec.holds(dict(options), rows) and not rec.holds(options, [[{"model_conds": {}}], None])
    patcher = tiny.load_unet(tiny.unet_state_dict(0))  # a model of its own
    call = fastpath.RecordedCall("test", patcher.model)
    call.params = call._addresses()  # as at a capture
    assert not call._weights_moved()
    out = patcher.model.diffusion_model.out[2]
    out.weight = torch.nn.Parameter(out.weight.detach().clone())  # e.g. a pack swapping in new weights
    assert call._weights_moved()
    call.params = call._addresses()
    sampling = patcher.model.model_sampling  # buffers are read by the graphs too (the sigmas)
    name, buffer = next(iter(sampling.named_buffers()))
    sampling.register_buffer(name, buffer.clone())  # e.g. a node replacing the model's schedule
    assert call._weights_moved()
    call.params = call._addresses()
    patcher.model.current_weight_patches_uuid = "another set of patches"  # the host patched the weights in place
    assert call._weights_moved()


@pytest.mark.parametrize("negative, rows", [("blurry", 2), ("", 1)])
def test_the_host_makes_room_for_the_rows_it_does_not_count(comfy, files, monkeypatch, caplog, negative, rows):
    """The host's estimate covers KSampler's two rows; the guider asks its model management for the
    empty prompt's row (unless the negative is the empty prompt) and the domain row on top, keeping
    this run's models loaded."""
    import comfy.model_management as mm
    asked = []
    real = mm.free_memory
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=[], **kw: asked.append((need, keep_loaded)) or real(need, device, keep_loaded, **kw))
    sample(comfy, monkeypatch, True, caplog, negative=negative, domain=["dom", 0], domain_scale=1.5,
           extra={"dom": loader(files["domain"])})
    model = tiny.tiny_model().model
    need, keep = asked[-1]
    assert need == model.memory_required([rows, 4, 8, 8])
    assert len(keep) == 2  # the base and the full-copy domain
    asked.clear()
    sample(comfy, monkeypatch, True, caplog, negative=negative, domain=["dom", 0], domain_scale=0.0,
           extra={"dom": loader(files["domain"])})
    assert not [a for a in asked if a[0] == model.memory_required([rows, 4, 8, 8])]  # nothing more without a term


def test_with_the_hosts_disable_cuda_graphs_no_recorded_call_is_a_cuda_graph_and_the_reason_says_so(comfy, files, monkeypatch):
    """Newer ComfyUI's --disable-cuda-graphs (its own graphs honour it) turns the pack's off too,
    under either allocator; the reason the log gives names the flag."""
    from comfy.cli_args import args
    fastpath = comfy.pack("nodes.sampling.fastpath")
    patcher = tiny.tiny_model()
    assert "cuda-graphs" not in (fastpath.graph_reason(patcher.model, {}) or "")  # on the CPU: weights not on the GPU
    monkeypatch.setattr(args, "disable_cuda_graphs", True, raising=False)
    assert fastpath.graph_reason(patcher.model, {}) == "ComfyUI was started with --disable-cuda-graphs"
