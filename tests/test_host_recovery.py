"""After a failure or a Cancel the host is as it was, and the next run gives what it gives in a
fresh host: a failed or cancelled training or sampling run leaves no weights, patches, hooks, cast
flags, adapters, CUDA graphs or loaded-model state behind. Runs in both tiers (on the GPU the
host's weights move between devices and the fast path's CUDA graphs are captured).
"""

import pytest
import torch
from safetensors.torch import load_file

from tests.support import tiny_nodes as tiny
from tests.support.graphs import eager_training_steps, loader, saved, text_to_image, train_graph
from tests.support.host import HostError
from test_host_gpu_dtypes import assert_same_state, host_state


DOMAIN_FILES = "recovery"  # conftest.folders writes recovery_domain.safetensors and recovery_lora.safetensors


def fail_on_call(monkeypatch, module, name: str, call: int, error=RuntimeError("injected failure")):
    """Make module.name raise `error` on its call-th call (1-based)."""
    real, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


def trained_weights(comfy, folders, name, **options) -> dict:
    comfy.run(train_graph(save_name=name, resume=False, steps=3, checkpoint_every=0, **options))
    return load_file(saved(name + ".safetensors"))


@pytest.mark.parametrize("mode, failure", [("lora", "error"), ("full", "cancel")])
def test_a_failed_training_run_leaves_the_next_one_unaffected(comfy, folders, monkeypatch, mode, failure):
    eager_training_steps(monkeypatch)
    loop = comfy.pack("training.loop")
    options = dict(mode=mode, training_dtype="bf16", gradient_checkpointing=True, preview_every=2)
    monkeypatch.setattr(comfy.pack("nodes.training.progress"), "PREVIEW_STEPS", 2)
    model, real_step = tiny.tiny_model(), loop.denoising_step
    before = trained_weights(comfy, folders, f"recover_{mode}_a", **options)
    state = host_state(model)
    if failure == "error":
        fail_on_call(monkeypatch, loop, "denoising_step", 2)  # inside the second step, after a whole one
    else:
        import comfy.model_management as mm
        fail_on_call(monkeypatch, loop, "denoising_step", 2, mm.InterruptProcessingException())
    with pytest.raises(HostError):
        comfy.run(train_graph(save_name=f"recover_{mode}_b", resume=False, steps=3, checkpoint_every=0, **options))
    setattr(loop, "denoising_step", real_step)
    assert_same_state(state, host_state(model))
    after = trained_weights(comfy, folders, f"recover_{mode}_c", **options)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_two_training_runs_in_one_process_give_the_same_weights(comfy, folders):
    """The host moves the VAE and UNet between devices on the GPU (weights created in inference
    mode, moved outside it): a second run in the same server must still train (it once failed with
    'Inference tensors do not track version counter')."""
    a = trained_weights(comfy, folders, "twice_a", mode="lora", training_dtype="bf16")
    b = trained_weights(comfy, folders, "twice_b", mode="lora", training_dtype="bf16")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("domain, failure", [("full", "error"), ("lora", "cancel")])
def test_a_failed_sampling_run_leaves_the_next_one_unaffected(comfy, folders, monkeypatch, domain, failure):
    """A failure in the third step (after the fast path recorded its calls and, on the GPU, captured
    its CUDA graphs), then the same graph again: the same latents as before the failure."""
    guider = comfy.pack("nodes.sampling.guider")
    name = "recovery_domain.safetensors" if domain == "full" else "recovery_lora.safetensors"
    prompt = text_to_image(steps=4, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(name)})
    first = comfy.run(prompt)["captured"]["out"]["samples"]
    model = tiny.tiny_model()
    state = host_state(model)
    if failure == "error":
        fail_on_call(monkeypatch, guider, "add_domain_terms", 3)
    else:
        import comfy.model_management as mm
        fail_on_call(monkeypatch, guider, "add_domain_terms", 3, mm.InterruptProcessingException())
    with pytest.raises(HostError):
        comfy.run(prompt)
    monkeypatch.undo()
    assert_same_state(state, host_state(model))
    assert model.model.current_patcher is None  # the sampling run's cleanup() ran
    again = comfy.run(prompt)["captured"]["out"]["samples"]
    assert torch.equal(again, first)


@pytest.mark.parametrize("fails", [False, True], ids=["ends-well", "fails"])
def test_a_full_copy_domain_gets_the_hosts_whole_run_protocol(comfy, folders, monkeypatch, fails):
    """pre_run before the run, cleanup() once after it, whether the run ends well (the host cleans up
    the models of the conditioning) or fails (the guider does, as the host does for the base)."""
    import nodes
    from comfy import patcher_extension as ext

    events = []
    domain = tiny.load_unet(tiny.domain_state_dict())
    domain.add_callback(ext.CallbacksMP.ON_PRE_RUN, lambda p: events.append("pre_run"))
    domain.add_callback(ext.CallbacksMP.ON_CLEANUP, lambda p: events.append("cleanup"))

    class HandOver:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "give"
        CATEGORY = "testing"

        def give(self):
            return (domain,)

    nodes.NODE_CLASS_MAPPINGS["TestHandOver"] = HandOver
    if fails:
        fail_on_call(monkeypatch, comfy.pack("nodes.sampling.guider"), "add_domain_terms", 1)
    prompt = text_to_image(steps=2, domain=["dom", 0], domain_scale=1.0, extra={"dom": {"class_type": "TestHandOver", "inputs": {}}})
    if fails:
        with pytest.raises(HostError):
            comfy.run(prompt)
    else:
        comfy.run(prompt)
    assert events == ["pre_run", "cleanup"]
    assert domain.model.current_patcher is None


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_host_unloading_the_unet_while_training_changes_nothing(comfy, folders, monkeypatch, mode):
    """The host may unload the UNet to make room while the VAE encodes the images or decodes a
    preview (low VRAM): training goes on with the weights it trains and ends where an undisturbed
    run ends."""
    from comfy import model_management as mm
    from comfy import sd

    monkeypatch.setattr(comfy.pack("nodes.training.progress"), "PREVIEW_STEPS", 2)
    options = dict(mode=mode, training_dtype="bf16", preview_every=2)
    undisturbed = trained_weights(comfy, folders, f"unload_{mode}_a", **options)
    unloads = []
    for name in ("encode", "decode"):
        real = getattr(sd.VAE, name)

        def unloading(self, *args, _real=real, **kwargs):
            unloads.append(1)
            mm.unload_all_models()
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(sd.VAE, name, unloading)
    monkeypatch.setattr(comfy.pack("nodes.training.files"), "CACHE_FOLDER", f".latent-cache-unload-{mode}")  # encode again
    disturbed = trained_weights(comfy, folders, f"unload_{mode}_b", **options)
    assert len(unloads) > 6  # every image encoded (and flipped), and the preview decoded
    assert all(torch.equal(disturbed[k], undisturbed[k]) for k in undisturbed)
