"""Safe to leave running: what a server that samples for hours needs of the fast path.

- An identical second run replays the first run's CUDA graphs (no capture) and gives the same
  latents bit for bit; graphs kept between runs stay within their bound and go when the host
  unloads its models, so CUDA's graph memory is back where it was (cudagraph.OWNER).
- A Cancel that lands while the fast path captures stops the run; the next run is unaffected.
- A hooked prompt (under dynamic VRAM the host then samples a non-dynamic copy of the base) leaves
  a LoRA domain as it is: its adapters are bound to the modules of the model that runs.
The memory and Cancel tests need a GPU (the GPU tier); the hook test runs on both tiers, on the
CPU with the host's swap to a copy of the base emulated as 0.33 makes it under dynamic VRAM.
"""
import logging
import os
import types

import pytest

import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image
from tests.support.host import HostError


@pytest.fixture(scope="module")
def files(comfy):
    d = comfy.model_dir("domain_unets")
    tiny.write_safetensors(os.path.join(d, "safe_domain.safetensors"), tiny.domain_state_dict())
    tiny.write_safetensors(os.path.join(d, "safe_lora.safetensors"), tiny.lora_state_dict(seed=5))
    return {"full": "safe_domain.safetensors", "lora": "safe_lora.safetensors"}


@pytest.fixture
def owner(comfy):
    """The pack's graph owner, empty before and after the test."""
    own = comfy.pack("cudagraph.owner").OWNER
    own.release()
    yield own
    own.release()


def run(comfy, domain_file, scale=1.5, **kw):
    kw.setdefault("steps", 4)
    prompt = text_to_image(domain=["dom", 0], domain_scale=scale, extra={"dom": loader(domain_file)}, **kw)
    return comfy.run(prompt)["captured"]["out"]["samples"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_an_identical_second_run_captures_nothing_and_gives_the_same_latents(comfy, files, owner, caplog, kind):
    """As a server runs prompts: the host's executor keeps each node's output while its inputs stay
    the same (the models, the LoRA, the prompts' encodings). A second run with another seed replays
    the graphs of the first; a third with the first's seed gives its latents bit for bit.

    Except, maybe, a LoRA domain under dynamic VRAM (ComfyUI 0.33+): there the host initialises the
    base again for a run ("Model Initializing"); where its weights land elsewhere, the graphs of an
    earlier run cannot serve and the run captures its own, saying why; where they land where they
    were, the graphs serve (an H100 has shown both). Either way the latents repeat."""
    caplog.set_level(logging.INFO)
    executor = comfy.executor()

    def sample(seed):
        prompt = text_to_image(steps=4, seed=seed, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files[kind])})
        return comfy.run(prompt, executor=executor)["captured"]["out"]["samples"]

    first = sample(7)
    captured = owner.captures
    assert captured >= 2  # the domain rows and the base rows
    caplog.clear()
    other = sample(8)
    again = sample(7)
    why = [r.getMessage() for r in caplog.records if "earlier" in r.getMessage() or "CUDA graphs:" in r.getMessage()]
    if comfy.dynamic_vram and kind == "lora" and owner.captures > captured:
        assert why and all("weights moved or were patched" in w for w in why), why
    else:
        assert owner.captures == captured and owner.reuses >= 4, why
    assert torch.equal(again, first) and not torch.equal(other, first)


@pytest.mark.gpu
def test_graphs_stay_within_their_bound_and_go_with_the_hosts_unload(comfy, files, owner, monkeypatch):
    """Runs at four batch sizes with both kinds of domain; then the host's unload. Kept graphs never
    exceed INDOMAIN_GRAPH_CACHE_GIB after a run; after the unload the owner holds nothing and CUDA's
    graph memory in use is where it was before the first run (cudaMallocAsync: the graphs' memory
    is CUDA's, outside torch's statistics)."""
    import comfy.model_management as mm
    cudagraph = comfy.pack("cudagraph")
    dev = mm.get_torch_device()
    mm.unload_all_models()
    mm.soft_empty_cache()
    before = cudagraph.graph_memory(dev)
    monkeypatch.setenv(cudagraph.ENV, "0.004")  # 4 MiB: fewer graphs than the runs make
    for batch in (1, 2, 3, 4):
        for kind in ("full", "lora"):
            run(comfy, files[kind], batch=batch, steps=3)
            assert owner.held(dev) <= cudagraph.limit_bytes(dev)
    monkeypatch.delenv(cudagraph.ENV)
    run(comfy, files["lora"], batch=2, steps=3)
    held = owner.held(dev)
    assert held > 0  # kept for the next run
    in_use = cudagraph.graph_memory(dev)
    mm.unload_all_models()
    mm.soft_empty_cache()
    after = cudagraph.graph_memory(dev)
    assert owner.held() == 0 and not owner.graphs
    if cudagraph.cuda_malloc_async():  # what the owner held is CUDA's graph memory, and it came back
        assert in_use - after >= 0.9 * held, (in_use, after, held)
        if not getattr(tiny.tiny_model(), "is_dynamic", lambda: False)():  # (0.33 keeps graphs of its own)
            assert after <= before + (16 << 20), (before, after)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_cancel_during_a_capture_stops_the_run_and_the_next_run_is_unaffected(comfy, files, owner, caplog, kind):
    """Cancel pressed while the fast path captures: the host's layers raise its interrupt inside the
    capture, and that stops the run (it was once taken for a failed capture, and the run went on to
    its end). The next run captures and gives what a run never cancelled gives."""
    import comfy.model_management as mm
    expected = run(comfy, files[kind])
    owner.release()
    module = tiny.tiny_model().model.diffusion_model.out[2]

    def cancel_when_capturing(mod, args):
        if torch.cuda.is_current_stream_capturing():
            mm.interrupt_current_processing(True)

    handle = module.register_forward_pre_hook(cancel_when_capturing)
    try:
        with pytest.raises(HostError) as stopped:
            run(comfy, files[kind])
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert stopped.value.interrupted
    assert not any("capture failed" in r.getMessage() for r in caplog.records)
    assert torch.equal(run(comfy, files[kind]), expected)


def _swap_to_a_copy_on_hooks(monkeypatch):
    """What ComfyUI 0.33's CFGGuider.inner_set_conds does under dynamic VRAM when a conditioning
    carries hooks: sample with another copy of the base, loaded again from its file."""
    import comfy.samplers
    import comfy.sd
    import folder_paths

    real = comfy.samplers.CFGGuider.inner_set_conds
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], "tiny_base.safetensors")

    def inner_set_conds(self, conds):
        if any(d.get("hooks") is not None for c in conds.values() for _, d in c):
            self.model_patcher = comfy.sd.load_diffusion_model(path)
        return real(self, conds)

    monkeypatch.setattr(comfy.samplers.CFGGuider, "inner_set_conds", inner_set_conds)


def test_a_hooked_prompt_leaves_a_lora_domain_as_it_is(comfy, files, monkeypatch, on_gpu):
    """Hooks that change nothing (an empty HookGroup on the positive) change nothing: the LoRA
    domain's adapters follow the host to the copy of the base it samples with hooked prompts (under
    dynamic VRAM; emulated where the host has none). Before, they stayed on the modules of the
    model the host no longer called, and the domain term was zero."""
    patcher = tiny.tiny_model()
    if not getattr(patcher, "is_dynamic", lambda: False)():
        _swap_to_a_copy_on_hooks(monkeypatch)
    plain = run(comfy, files["lora"])
    assert not close(plain, run(comfy, files["lora"], scale=0.0), rel=1e-3)  # the domain term matters here
    hook = {"class_type": "TestHookedConditioning", "inputs": {"conditioning": ["pos", 0]}}
    prompt = text_to_image(steps=4, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["lora"]), "hooked": hook})
    prompt["sample"]["inputs"]["positive"] = ["hooked", 0]
    hooked = comfy.run(prompt)["captured"]["out"]["samples"]
    assert close(hooked, plain, rel=2e-3 if on_gpu else 1e-5), "the hooked prompt changed the LoRA domain's image"


def test_the_hosts_free_memory_survives_its_list_of_loaded_models_shrinking_under_it(comfy, monkeypatch):
    """The host's free_memory walks its loaded models by index; unloading one can let the garbage collector
    take another off that list (ComfyUI issue 14365: IndexError in whichever node loaded a model next, seen
    in the GPU tier on 0.33). The pack's wrapper of free_memory walks the shorter list again."""
    import comfy.model_management as mm

    class Loaded:  # what free_memory reads of a host LoadedModel
        device, currently_used = torch.device("cpu"), True

        def __init__(self, drops=None):
            self.model, self.drops, self.unloads = types.SimpleNamespace(is_dynamic=lambda: False, model=self), drops, 0

        def is_dead(self):
            return False

        def model_offloaded_memory(self):
            return 0

        def model_memory(self):
            return 1

        def model_unload(self, *args, **kwargs):
            self.unloads += 1
            if self.drops in mm.current_loaded_models:  # as the finalizer of the model it kept alive
                mm.current_loaded_models.remove(self.drops)
            return True

    first = Loaded()
    models = [first, Loaded(), Loaded(drops=first)]  # walked from the end: the last unloads first
    monkeypatch.setattr(mm, "current_loaded_models", list(models))
    unloaded = mm.free_memory(1e30, torch.device("cpu"))
    assert mm.current_loaded_models == [] and {id(m) for m in unloaded} <= {id(m) for m in models}
    assert models[1].unloads >= 1
