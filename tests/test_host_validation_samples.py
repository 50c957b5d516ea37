"""Train Domain UNet's validation samples in the real host (issue 33, item 1): at every checkpoint a
grid of the user's prompts x domain scales, each image what Load Domain UNet + KSampler (Domain
Guidance) give with the checkpoint's file; off without prompts; Cancel, resume, TensorBoard, and
what the host is left with."""
import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.support.graphs import eager_training_steps, reproducible_dtype, text_to_image, train_graph, written
from tests.support.host import HostError

PROMPTS = ["a photo of a cat", "a red house by the sea"]
SCALES = [0.0, 1.5]
VALIDATION = dict(validation_prompts="\n".join(PROMPTS) + "\n\n", validation_domain_scales="0, 1.5", validation_seed=3,
                  validation_steps=4)


def train_with_samples(comfy, clip=True, **options):
    """train_graph with `clip` wired and the validation_samples output (slot 3) captured."""
    prompt = train_graph(**options)
    if clip:
        prompt["train"]["inputs"]["clip"] = ["ckpt", 1]
    prompt["cap_samples"] = {"class_type": "TestCapture", "inputs": {"value": ["train", 3], "label": "samples"}}
    comfy.run(prompt)
    return comfy.captured["samples"]


def grids(name) -> dict[int, Path]:
    """step -> the grid file of save name `name`."""
    import folder_paths
    folder = Path(folder_paths.get_output_directory()) / "indomain_previews" / name
    return {int(p.stem.split("_")[-1]): p for p in sorted(folder.glob("validation_step_*.png"))}


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def cell(comfy, grid: np.ndarray, row: int, col: int, side: int = 64) -> np.ndarray:
    layout = comfy.pack("nodes.training.samples").GridLayout(len(PROMPTS), len(SCALES), side, side)
    left, top = layout.cell(row, col)
    assert grid.shape[:2] == layout.size[::-1]
    return grid[top:top + side, left:left + side]


def sampled(comfy, prompt, scale, cfg, domain_file=None) -> np.ndarray:
    """What the user's graph gives: Load Domain UNet (the file) -> KSampler (Domain Guidance) (the
    empty prompt as negative, an empty 64 x 64 latent) -> VAE Decode, as Save Image's 0..255;
    without a file, the stock KSampler."""
    extra = {"dom": {"class_type": "InDomainUNetLoader", "inputs": {
        "unet_name": domain_file, "lora_strength": 1.0, "base_model": ["ckpt", 0]}}} if domain_file else {}
    graph = text_to_image(sampler="InDomainKSampler" if domain_file else "KSampler", positive=prompt, negative="",
                          seed=VALIDATION["validation_seed"], steps=VALIDATION["validation_steps"], cfg=cfg,
                          domain=["dom", 0] if domain_file else None, domain_scale=scale, extra=extra)
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    graph["cap"]["inputs"]["value"] = ["decode", 0]
    comfy.run(graph)
    return np.clip(255.0 * comfy.captured["out"][0].numpy(), 0, 255).astype(np.uint8).astype(np.float32)


# --- what the grid is --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "full"])
def test_each_image_is_what_load_domain_unet_and_the_domain_sampler_give_with_the_checkpoint(comfy, folders, on_gpu, mode):
    """A grid at each checkpoint and the end (rows: prompts, blank lines dropped; columns: domain
    scales); each image of the last grid is the saved file sampled through the host's nodes at the
    same seed and settings (cfg: the family's usual, 7 for SD1.x); domain_scale 0 is the stock
    KSampler, the same at every checkpoint; the node returns the last grid; the training is what it
    is without validation samples."""
    name = f"val_{mode}"
    options = dict(mode=mode, steps=2, checkpoint_every=1, learning_rate=1e-2 if mode == "lora" else 1e-3, resume=False,
                   training_dtype=reproducible_dtype(on_gpu))
    returned = train_with_samples(comfy, save_name=name, **options, **VALIDATION)
    files = grids(name)
    assert sorted(files) == [1, 2]
    last = pixels(files[2])
    assert torch.equal(returned, torch.from_numpy(last / 255.0).unsqueeze(0))
    with Image.open(files[2]) as image:
        record = json.loads(image.text["indomain.validation"])
    assert record["prompts"] == PROMPTS and record["domain_scales"] == SCALES and record["cfg"] == 7.0
    assert (record["step"], record["seed"], record["steps"], record["scheduler"]) == (2, 3, 4, "normal")
    for row, prompt in enumerate(PROMPTS):
        assert np.abs(cell(comfy, last, row, 0) - sampled(comfy, prompt, 0.0, 7.0)).max() == 0  # KSampler
        expected = sampled(comfy, prompt, 1.5, 7.0, domain_file=f"{name}.safetensors")
        got = cell(comfy, last, row, 1)
        assert np.abs(got - expected).max() <= 1.0, np.abs(got - expected).max()
        assert np.abs(got - cell(comfy, last, row, 0)).max() > 0  # the domain's pull shows
        earlier = pixels(files[1])
        assert np.array_equal(cell(comfy, earlier, row, 0), cell(comfy, last, row, 0))
        assert not np.array_equal(cell(comfy, earlier, row, 1), got)  # another checkpoint, other weights

    plain = f"val_{mode}_plain"
    train_with_samples(comfy, save_name=plain, **options)
    a, b = load_file(saved_file(name)), load_file(saved_file(plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved_file(name: str) -> str:
    from tests.support.graphs import saved
    return saved(f"{name}.safetensors")


def test_without_prompts_nothing_is_sampled_and_the_output_says_so(comfy, folders, monkeypatch):
    """validation_prompts empty (the default, and a workflow saved before the inputs existed): no grid,
    no sampling, and validation_samples is a small note."""
    samples = comfy.pack("nodes.training.samples")
    called = []
    monkeypatch.setattr(samples.ValidationSamples, "__call__", lambda *a, **k: called.append(a))
    returned = train_with_samples(comfy, save_name="val_off", steps=2, validation_prompts=" \n ")
    assert called == [] and grids("val_off") == {}
    assert returned.shape == (1, 48, 320, 3) and returned.std() > 0.01


def test_prompts_without_clip_or_bad_scales_are_refused_before_anything_is_written(comfy, folders):
    with pytest.raises(HostError) as e:
        train_with_samples(comfy, clip=False, save_name="val_noclip", steps=2, **VALIDATION)
    assert "validation_prompts" in e.value.exception_message and "clip" in e.value.exception_message
    with pytest.raises(HostError) as e:
        train_with_samples(comfy, save_name="val_scales", steps=2, **{**VALIDATION, "validation_domain_scales": "0, strong"})
    assert "validation_domain_scales" in e.value.exception_message and "'strong'" in e.value.exception_message
    assert written("val_noclip") == [] and written("val_scales") == []
    assert grids("val_noclip") == {} and grids("val_scales") == {}


# --- Cancel and resume ------------------------------------------------------------------------

def test_cancel_while_sampling_keeps_the_checkpoint_and_a_resumed_run_makes_the_same_grids(comfy, folders, monkeypatch):
    """Cancel while the grid of step 4 is sampled: the checkpoint of step 4 is kept, that grid is not
    written (nor a temp file), the one of step 2 is; the resumed run makes the missing grid first,
    leaves step 2's as it was, and its grids are those of an uninterrupted run."""
    mm = importlib.import_module("comfy.model_management")
    settings = dict(mode="lora", steps=6, checkpoint_every=2, learning_rate=1e-2, **VALIDATION)
    train_with_samples(comfy, save_name="val_straight", resume=False, **settings)
    straight = grids("val_straight")

    server = comfy.server
    say = server.send_progress_text

    def cancel_in_the_samples_of_step_4(text, node_id, sid=None):
        say(text, node_id, sid)
        if text.startswith("validation samples at step 4: 2/"):
            mm.interrupt_current_processing(True)  # what the UI's Cancel button does

    monkeypatch.setattr(server, "send_progress_text", cancel_in_the_samples_of_step_4)
    with pytest.raises(HostError) as e:
        train_with_samples(comfy, save_name="val_stopped", resume=False, **settings)
    assert e.value.interrupted
    monkeypatch.setattr(server, "send_progress_text", say)
    state = comfy.pack("training.checkpoint").read_state_header(os.path.splitext(saved_file("val_stopped"))[0] + ".indomain-state")
    assert state.step == 4
    assert sorted(grids("val_stopped")) == [2]
    folder = grids("val_stopped")[2].parent
    assert not [p for p in os.listdir(folder) if ".tmp-" in p]
    before = grids("val_stopped")[2].read_bytes()

    train_with_samples(comfy, save_name="val_stopped", **settings)
    texts = [t for t in comfy.server.progress_texts("train") if t.startswith(("validation samples", "step "))]
    assert texts[0].startswith("validation samples at step 4") and texts[-1].startswith("validation samples at step 6")
    resumed = grids("val_stopped")
    assert sorted(resumed) == [2, 4, 6] and resumed[2].read_bytes() == before
    for step in (2, 4, 6):
        assert np.abs(pixels(resumed[step]) - pixels(straight[step])).max() <= 1.0, step


def test_a_resumed_run_samples_the_grid_it_resumes_from_again_only_if_it_was_made_otherwise(comfy, folders, monkeypatch):
    """Queued again with the same settings, a finished run returns its last grid without sampling;
    with other prompts, it samples that checkpoint again."""
    samples = comfy.pack("nodes.training.samples")
    settings = dict(mode="lora", steps=2, checkpoint_every=0, learning_rate=1e-2, **VALIDATION)
    first = train_with_samples(comfy, save_name="val_again", resume=False, **settings)
    taken, real = [], samples.ValidationSamples._sample
    monkeypatch.setattr(samples.ValidationSamples, "_sample", lambda self, *a: taken.append(a[0]) or real(self, *a))
    again = train_with_samples(comfy, save_name="val_again", **{**settings, "validation_seed": 3})
    assert taken == [] and torch.equal(again, first)
    other = train_with_samples(comfy, save_name="val_again", **{**settings, "validation_prompts": "a teapot"})
    assert taken == [2] and other.shape[1] < first.shape[1]  # one row now
    with Image.open(grids("val_again")[2]) as image:
        assert json.loads(image.text["indomain.validation"])["prompts"] == ["a teapot"]


# --- what the host is left with -----------------------------------------------------------------

def loaded(patcher) -> bool:
    mm = importlib.import_module("comfy.model_management")
    return any(m.model is not None and m.model.model is patcher.model for m in mm.current_loaded_models)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_after_the_samples_the_domain_is_unloaded_its_graphs_let_go_and_the_training_module_is_back(
        comfy, folders, monkeypatch, mode):
    """After each grid: the CUDA graphs its sampling captured are released (a stand-in graph here, on the
    CPU), those kept from before are not; a full-copy domain is no longer loaded, nor the base its
    training does not read; LoRA training's module is loaded again with its adapters on."""
    samples, cudagraph = comfy.pack("nodes.training.samples"), comfy.pack("cudagraph")
    dynamic_vram, owner = comfy.pack("nodes.dynamic_vram"), cudagraph.OWNER

    class StandIn:
        device, nbytes, alive = torch.device("cpu"), 0, True

        def __init__(self):
            self.released = False

        def release(self):
            self.released = True

    kept, made, seen = StandIn(), [], []
    owner.graphs[("sampling", "kept from before")] = (kept, True)
    real_image, real_sample = samples.ValidationSamples._image, samples.ValidationSamples._sample

    def image(self, domain, positive, scale):
        made.append(StandIn())
        owner.graphs[("sampling", "validation", len(made))] = (made[-1], True)
        seen.append(domain)
        return real_image(self, domain, positive, scale)

    def sample(self, step, weights):
        rows = real_sample(self, step, weights)
        unet = self.trainer.model.diffusion_model
        # (under dynamic VRAM, 0.33 on a GPU, LoRA trains on the host's non-dynamic copy of the base, loaded in its stead)
        base_back = loaded(self.model) or dynamic_vram.patcher_is_dynamic(self.model)
        seen.append(("after", loaded(seen[-1]), base_back, sum(len(m._forward_hooks) for m in unet.modules())))
        return rows

    monkeypatch.setattr(samples.ValidationSamples, "_image", image)
    monkeypatch.setattr(samples.ValidationSamples, "_sample", sample)
    try:
        train_with_samples(comfy, save_name=f"val_memory_{mode}", mode=mode, steps=2, checkpoint_every=0, resume=False,
                           **VALIDATION)
    finally:
        owner.graphs.pop(("sampling", "kept from before"), None)
    assert len(made) == 4 and all(g.released for g in made) and not kept.released
    assert not [k for k in owner.graphs if k[:2] == ("sampling", "validation")]
    (_, domain_loaded, base_loaded, hooks), = [s for s in seen if isinstance(s, tuple)]
    if mode == "full":
        assert not domain_loaded and not base_loaded
    else:
        assert hooks > 0  # the adapters' hooks are on the module (the run was still training)
        assert base_loaded


def test_the_samples_see_the_host_as_it_was_and_out_of_memory_says_what_to_lower(comfy, folders, monkeypatch):
    """While the grid is sampled, training's changes to the host are undone (here: cuDNN attention,
    which a run with gradient checkpointing turns off, is on; ComfyUI 0.33's in_training is off) and
    come back after; out of memory while sampling names the inputs to lower and the kept checkpoint."""
    samples, mm = comfy.pack("nodes.training.samples"), importlib.import_module("comfy.model_management")
    seen, real = [], samples.ValidationSamples._image

    def image(self, *args):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), getattr(mm, "in_training", False)))
        return real(self, *args)

    monkeypatch.setattr(samples.ValidationSamples, "_image", image)
    eager_training_steps(monkeypatch)
    loop, steps = comfy.pack("training.loop"), []
    real_step = loop.denoising_step
    monkeypatch.setattr(loop, "denoising_step", lambda *a, **k: steps.append(
        (torch.backends.cuda.cudnn_sdp_enabled(), getattr(mm, "in_training", True))) or real_step(*a, **k))
    train_with_samples(comfy, save_name="val_host", steps=2, checkpoint_every=1, gradient_checkpointing=True,
                       resume=False, **VALIDATION)
    assert len(seen) == 6 and all(s == (True, False) for s in seen), seen  # (step 2: scale 0 from step 1's)
    assert len(steps) == 2 and all(s == (False, True) for s in steps), steps
    assert torch.backends.cuda.cudnn_sdp_enabled()

    def out_of_memory(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(samples.ValidationSamples, "_image", out_of_memory)
    with pytest.raises(HostError) as e:
        train_with_samples(comfy, save_name="val_oom", steps=2, checkpoint_every=1, resume=False, **VALIDATION)
    message = e.value.exception_message
    assert "validation samples of step 1" in message and "validation_prompts" in message and "is kept" in message
    assert comfy.pack("training.checkpoint").read_state_header(
        os.path.splitext(saved_file("val_oom"))[0] + ".indomain-state").step == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (scripts/setup.sh installs it)")
def test_tensorboard_shows_each_checkpoints_grid(comfy, folders):
    import io

    import folder_paths
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_with_samples(comfy, save_name="val_board", steps=4, checkpoint_every=2, resume=False, tensorboard=True,
                       **VALIDATION)
    acc = EventAccumulator(str(Path(folder_paths.get_output_directory()) / "indomain_logs" / "val_board"),
                           size_guidance={"images": 0})
    acc.Reload()
    shown = acc.Images("validation/samples")
    assert [e.step for e in shown] == [2, 4]
    for event, (step, path) in zip(shown, sorted(grids("val_board").items())):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"),
                                         dtype=np.float32), pixels(path))
