"""The GPU tier's own tests (`bash scripts/test.sh --gpu`): what only a GPU exercises.

The rest of the suite runs in that tier too, with the host on the GPU and its own defaults (fp16
weights on an H200, no manual cast, CUDA graphs on the fast path). Skipped on the CPU, saying why.
"""
import logging

import pytest
import torch
from safetensors.torch import load_file

from tests.support import tiny_nodes as tiny
from tests.support.graphs import eager_training_steps, loader, saved, text_to_image, train_graph
from test_host_gpu_dtypes import assert_same_state, host_state

pytestmark = pytest.mark.gpu


DOMAIN_FILES = "gpu"  # conftest.folders writes gpu_domain.safetensors and gpu_lora.safetensors


def test_the_host_runs_the_unet_on_the_gpu_in_half_precision_without_manual_cast(comfy):
    model = tiny.tiny_model()
    assert model.load_device.type == "cuda"
    assert model.model.get_dtype() in (torch.float16, torch.bfloat16) and model.model.manual_cast_dtype is None


@pytest.mark.parametrize("previews", [0, 2], ids=["no-preview", "preview"])
@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["no-ema", "ema"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_every_training_setting_trains_on_the_gpu(comfy, folders, monkeypatch, mode, precision, checkpointing, ema, previews):
    monkeypatch.setattr(comfy.pack("nodes.training.progress"), "PREVIEW_STEPS", 4)
    model = tiny.tiny_model()
    before = host_state(model)
    name = f"matrix_{mode}_{precision}_{int(checkpointing)}_{ema}_{previews}"
    comfy.run(train_graph(mode=mode, training_dtype=precision, gradient_checkpointing=checkpointing, ema_decay=ema,
                          preview_every=previews, steps=2, checkpoint_every=1, save_name=name, resume=False))
    weights = load_file(saved(name + ".safetensors"))
    assert weights and all(torch.isfinite(v.float()).all() for v in weights.values())
    assert_same_state(before, host_state(model))


def test_the_gpu_resumes_exactly_and_a_cancel_keeps_the_checkpoint(comfy, folders, monkeypatch):
    import comfy.model_management as mm

    eager_training_steps(monkeypatch)  # (a cancel inside a graphed step: tests/test_cudagraph.py)
    options = dict(mode="lora", training_dtype="bf16", gradient_checkpointing=True, steps=4, checkpoint_every=2)
    comfy.run(train_graph(save_name="gpu_whole", resume=False, **options))
    whole = load_file(saved("gpu_whole.safetensors"))
    loop = comfy.pack("training.loop")
    real, calls = loop.denoising_step, []

    def cancel_at_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise mm.InterruptProcessingException()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "denoising_step", cancel_at_3)
    with pytest.raises(Exception):
        comfy.run(train_graph(save_name="gpu_parts", resume=False, **options))
    monkeypatch.setattr(loop, "denoising_step", real)
    assert load_file(saved("gpu_parts.safetensors")).keys() == whole.keys()  # step 2's file, complete
    comfy.run(train_graph(save_name="gpu_parts", resume=True, **options))
    parts = load_file(saved("gpu_parts.safetensors"))
    assert all(torch.equal(parts[k], whole[k]) for k in whole)  # bf16 on a GPU repeats bit for bit


@pytest.mark.parametrize("domain", ["gpu_domain.safetensors", "gpu_lora.safetensors"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_graphs_replay_what_the_host_computes(comfy, folders, monkeypatch, caplog, domain, batch):
    """The graph path, the eager path and the straightforward path give the same latents."""
    import logging
    caplog.set_level(logging.INFO)
    prompt = text_to_image(steps=4, batch=batch, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(domain)})
    out = {}
    for mode in ("1", "eager", "0"):
        monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", mode)
        caplog.clear()
        out[mode] = comfy.run(prompt)["captured"]["out"]["samples"]
        paths = [r.getMessage() for r in caplog.records if "fast path (" in r.getMessage()]
        if mode == "1":
            assert paths and all("fast path (graph" in p for p in paths)
        elif mode == "eager":
            assert paths and all("fast path (direct" in p for p in paths)
    rel = 1e-5 if domain == "gpu_domain.safetensors" else 1.2e-4  # a LoRA's adapters vs its merged weights
    scale = out["0"].abs().max()
    # eager: a LoRA domain's rows ride in the base's call (nodes/sampling/lora_rows_in_base_call.py),
    # other batches than the graphs' separate calls (fp16 under 0.33's dynamic VRAM: 5.0e-5 measured at batch 2)
    assert (out["1"] - out["eager"]).abs().max() <= (1e-5 if domain == "gpu_domain.safetensors" else rel) * scale
    assert (out["1"] - out["0"]).abs().max() <= rel * scale


def test_a_failed_capture_falls_back_and_leaves_the_random_generator_usable(comfy, folders, monkeypatch, caplog):
    """A capture that fails (here: forced) keeps the direct call; an SDE sampler's noise after it
    works, and the next run captures its graphs again, under either allocator (under ComfyUI's
    cudaMallocAsync a failed capture once made every later one fail, then aborted the process)."""
    owner = comfy.pack("cudagraph.owner")
    owner.OWNER.release()  # no graph of an earlier test to reuse: this run captures
    real = owner.Graph

    class Failing(real):
        def __init__(self, fn, inputs, *args, **kwargs):
            def failing(*a):
                fn(*a)
                torch.cuda.synchronize()  # not allowed while capturing (refused before CUDA sees it)
            super().__init__(failing, inputs, *args, **kwargs)

    monkeypatch.setattr(owner, "Graph", Failing)
    prompt = text_to_image(steps=4, sampler_name="dpmpp_2m_sde", domain=["dom", 0], domain_scale=1.5,
                           extra={"dom": loader("gpu_domain.safetensors")})
    failed = comfy.run(prompt)["captured"]["out"]["samples"]
    assert any("CUDA graph capture failed" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "0")
    straightforward = comfy.run(prompt)["captured"]["out"]["samples"]
    assert (failed - straightforward).abs().max() <= 1e-5 * straightforward.abs().max()
    monkeypatch.setattr(owner, "Graph", real)
    monkeypatch.delenv("INDOMAIN_FAST_DOMAIN")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = comfy.run(prompt)["captured"]["out"]["samples"]
    assert not any("capture failed" in r.getMessage() for r in caplog.records)
    assert any("fast path (graph" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert (again - straightforward).abs().max() <= 1e-5 * straightforward.abs().max()


def test_with_the_hosts_disable_cuda_graphs_the_fast_path_makes_no_graph_and_says_why(comfy, folders, caplog, monkeypatch):
    """ComfyUI started with --disable-cuda-graphs (newer ComfyUI's switch, which its own graphs
    honour): the recorded calls are made directly, saying why once per record, with the
    straightforward path's latents."""
    from comfy.cli_args import args
    monkeypatch.setattr(args, "disable_cuda_graphs", True, raising=False)
    prompt = text_to_image(steps=3, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader("gpu_domain.safetensors")})
    with caplog.at_level(logging.INFO):
        fast = comfy.run(prompt)["captured"]["out"]["samples"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("no CUDA graph (ComfyUI was started with --disable-cuda-graphs)" in line for line in lines), lines
    assert not any("capture failed" in line for line in lines)
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "0")
    straightforward = comfy.run(prompt)["captured"]["out"]["samples"]
    # One call for all rows against the host's own batching of them (fp16): 2.9e-5 measured on 0.33.
    assert (fast - straightforward).abs().max() <= 2e-4 * straightforward.abs().max()


def test_after_a_run_the_only_cuda_graphs_are_those_the_owner_keeps(comfy, folders):
    """A run's graphs outlive it only in cudagraph.OWNER (for a later identical run); once it lets
    go, no CUDA graph is left in the process."""
    import gc
    owner = comfy.pack("cudagraph.owner").OWNER
    prompt = text_to_image(steps=3, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader("gpu_domain.safetensors")})
    comfy.run(prompt)
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, torch.cuda.CUDAGraph)]
    kept = [g.graph for g, _ in owner.graphs.values() if g.alive]
    assert live and {id(o) for o in live} == {id(g) for g in kept}
    owner.release()
    gc.collect()
    del live, kept
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, torch.cuda.CUDAGraph)] == []
