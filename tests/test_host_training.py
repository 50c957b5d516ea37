"""Train Domain UNet in the real host: it learns, its files load in our loader and the host's own,
it resumes exactly, Cancel and failures keep the last checkpoint, and bad input is refused
before anything is written."""
import errno
import glob
import importlib
import importlib.util
import logging
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support.graphs import close, eager_training_steps, reproducible_dtype, saved, text_to_image, train_graph, written
from tests.support.host import HostError
from tests.support.tiny_nodes import domain_images

REPO = Path(__file__).resolve().parents[1]





def train(comfy, label="trained", **options):
    comfy.run(train_graph(label=label, **options))
    return comfy.captured[label], comfy.captured[label + "_loss"]


def error_of(comfy, **options) -> str:
    with pytest.raises(HostError) as e:
        comfy.run(train_graph(**options))
    return e.value.exception_message


# --- it learns, and what it writes ------------------------------------------------------------

def shown_losses(comfy) -> list[float]:
    """The per-step losses the node showed in the UI's progress text ("step k/N  loss x ...")."""
    return [float(t.split("loss ")[1].split()[0]) for t in comfy.server.progress_texts("train") if t.startswith("step ")]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_loss_falls_and_the_model_file_is_written(comfy, folders, mode):
    model, curve = train(comfy, mode=mode, steps=40 if mode == "lora" else 30, batch_size=4 if mode == "lora" else 2,
                         learning_rate=1e-2 if mode == "lora" else 1e-3,
                         save_name=f"learn_{mode}", checkpoint_every=0)
    losses = shown_losses(comfy)
    steps = 40 if mode == "lora" else 30
    assert len(losses) == steps
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < (0.95 if mode == "lora" else 0.7) * first, f"{mode}: mean loss {first:.4f} -> {last:.4f}"
    assert curve.shape == (1, 320, 640, 3) and curve.std() > 0.01  # a drawn curve, not a blank image
    from comfy.model_patcher import ModelPatcher
    from tests.support.tiny_nodes import tiny_model

    # full: a model of its own; LoRA: a clone of the base (under dynamic VRAM, the host's dynamic patcher)
    assert type(model) is (type(tiny_model()) if mode == "lora" else ModelPatcher)
    state = comfy.pack("training.checkpoint").read_state_header(saved(f"learn_{mode}.indomain-state"))
    assert state.step == steps
    with safe_open(saved(f"learn_{mode}.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["indomain.mode"] == mode and meta["indomain.steps"] == str(steps) and meta["indomain.image_count"] == "6"
    assert meta["indomain.architecture"] == "SD15" and meta["indomain.prediction_type"] == "eps"
    assert meta["indomain.resolution"] == "64" and len(meta["indomain.base_fingerprint"]) == 16
    assert meta["indomain.pack_version"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    if mode == "lora":
        assert all(k.startswith("diffusion_model.") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    else:
        assert "input_blocks.0.0.weight" in keys


def test_ema_file_has_left_the_base_weights_after_a_few_steps(comfy, folders):
    """With ema_decay 0.999 the written EMA weights are not the base's: the warm-up
    (decay min(0.999, (1 + t) / (10 + t))) lets 4 steps move them most of the way the weights went
    (without it the EMA would keep 0.999^4 of the base, and move 0.4 % of the way)."""
    from tests.support.tiny_nodes import unet_state_dict

    base = unet_state_dict(0)
    options = dict(mode="full", steps=4, learning_rate=1e-3, checkpoint_every=0)
    train(comfy, save_name="ema_off", ema_decay=0.0, **options)
    train(comfy, save_name="ema_on", ema_decay=0.999, **options)
    trained, ema = (load_file(saved(f"{name}.safetensors")) for name in ("ema_off", "ema_on"))

    def moved(weights):
        return sum(float((weights[k].float() - base[k]).square().sum()) for k in base) ** 0.5

    assert moved(trained) > 0
    assert moved(ema) > 0.5 * moved(trained), (moved(ema), moved(trained))


# --- the files load in our loader and in the host's own loaders, and sample as the output does --

def same_sample(comfy, domain_link, extra, reference_model_link, reference_extra):
    """InDomainKSampler(cfg 0, domain 1) with domain_link vs stock KSampler(cfg 1) on the reference model."""
    ours = text_to_image(positive="", negative="", cfg=0.0, domain=domain_link, extra=extra, steps=3)
    comfy.run(ours)
    a = comfy.captured["out"]["samples"]
    ref = text_to_image(sampler="KSampler", positive="", negative="", cfg=1.0, steps=3,
                        extra={**reference_extra, "sample": None})
    ref.pop("sample")
    ref["sample"] = text_to_image(sampler="KSampler", positive="", negative="", cfg=1.0, steps=3)["sample"]
    ref["sample"]["inputs"]["model"] = reference_model_link
    comfy.run(ref)
    return a, comfy.captured["out"]["samples"]


@pytest.fixture(scope="module")
def trained(comfy, folders):
    """One short full run and one LoRA run: the files go where the host's loaders look, nothing added by hand."""
    for mode in ("full", "lora"):
        comfy.run(train_graph(mode=mode, steps=6, learning_rate=1e-3 if mode == "full" else 1e-2, save_name=f"out_{mode}"))
    return folders


def train_node(mode, **options):
    return {"class_type": "InDomainTrainUNet", "inputs": {
        **train_graph(mode=mode, steps=6, learning_rate=1e-3 if mode == "full" else 1e-2, save_name=f"out_{mode}",
                      **options)["train"]["inputs"]}}


def test_full_file_loads_in_the_hosts_unet_loader_and_ours(comfy, trained):
    null = {"null": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}}}
    trained_out, host_loaded = same_sample(
        comfy, ["train", 0], {"train": train_node("full")},
        ["unet", 0], {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "out_full.safetensors", "weight_dtype": "default"}}})
    assert close(trained_out, host_loaded, 1e-4)
    ours, _ = same_sample(comfy, ["dom", 0], {"dom": {"class_type": "InDomainUNetLoader", "inputs": {
        "unet_name": "out_full.safetensors", "lora_strength": 1.0, "base_model": ["ckpt", 0]}}}, ["ckpt", 0], {})
    assert close(ours, host_loaded, 1e-4)
    base, _ = same_sample(comfy, ["ckpt", 0], {}, ["ckpt", 0], {})
    assert not close(base, host_loaded, 1e-2)  # training changed the model


def test_lora_file_loads_in_the_hosts_lora_loader_and_ours(comfy, trained):
    trained_out, host_loaded = same_sample(
        comfy, ["train", 0], {"train": train_node("lora")},
        ["lora", 0], {"lora": {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "out_lora.safetensors",
            "strength_model": 1.0, "strength_clip": 1.0}}})
    assert close(trained_out, host_loaded, 1e-4)
    ours, _ = same_sample(comfy, ["dom", 0], {"dom": {"class_type": "InDomainUNetLoader", "inputs": {
        "unet_name": "out_lora.safetensors", "lora_strength": 1.0, "base_model": ["ckpt", 0]}}}, ["ckpt", 0], {})
    assert close(ours, host_loaded, 1e-4)
    base, _ = same_sample(comfy, ["ckpt", 0], {}, ["ckpt", 0], {})
    assert not close(base, host_loaded, 1e-3)


def listed(comfy, node_id, input_name) -> list[str]:
    """The file names a node's combo offers, as /object_info gives them to the page."""
    node = comfy.nodes[node_id]
    inputs = node.INPUT_TYPES() if hasattr(node, "INPUT_TYPES") else node.GET_SCHEMA().get_v1_info(node).input
    options = inputs["required"][input_name]
    return options[0] if isinstance(options[0], list) else options[1]["options"]


def test_each_kind_of_file_is_listed_where_the_host_looks_for_it(comfy, trained):
    """A LoRA goes to models/loras (Load LoRA), a full copy to models/diffusion_models (Load Diffusion
    Model); Load Domain UNet lists both, with no folder added by hand."""
    import folder_paths
    assert os.path.dirname(saved("out_lora.safetensors")) == os.path.join(folder_paths.models_dir, "loras")
    assert os.path.dirname(saved("out_full.safetensors")) == os.path.join(folder_paths.models_dir, "diffusion_models")
    assert "out_lora.safetensors" in listed(comfy, "LoraLoader", "lora_name")
    assert "out_full.safetensors" not in listed(comfy, "LoraLoader", "lora_name")
    assert "out_full.safetensors" in listed(comfy, "UNETLoader", "unet_name")
    assert "out_lora.safetensors" not in listed(comfy, "UNETLoader", "unet_name")
    ours = listed(comfy, "InDomainUNetLoader", "unet_name")
    assert {"out_lora.safetensors", "out_full.safetensors"} <= set(ours)
    assert not [n for n in ours if n.endswith(".indomain-state")]


def test_a_file_in_the_old_domain_unets_folder_still_loads_and_its_run_resumes_there(comfy, folders):
    """Files trained before 0.3.0 live in models/domain_unets: Load Domain UNet still lists them, and
    training with their save name goes on where they are (its checkpoint is there)."""
    import shutil
    train(comfy, save_name="legacy", steps=2, checkpoint_every=1)
    for ext in (".safetensors", ".indomain-state"):  # what a 0.2.0 run left behind
        shutil.move(saved("legacy" + ext), os.path.join(folders, "legacy" + ext))
    comfy.run(text_to_image(domain=["dom", 0], extra={"dom": {"class_type": "InDomainUNetLoader", "inputs": {
        "unet_name": "legacy.safetensors", "lora_strength": 1.0, "base_model": ["ckpt", 0]}}}))
    train(comfy, save_name="legacy", steps=3)
    assert len(shown_losses(comfy)) == 1  # resumed at step 2, not started over
    assert file_step(os.path.join(folders, "legacy.safetensors")) == 3
    assert not os.path.exists(saved("legacy.safetensors"))


def test_training_never_overwrites_a_file_it_did_not_write_nor_shadows_another(comfy, folders):
    """models/loras holds the user's own LoRAs: a save name that would overwrite one is refused, and so
    is a name Load Domain UNet already lists for another file (e.g. a full copy of the same name)."""
    import folder_paths
    theirs = os.path.join(folder_paths.models_dir, "loras", "their_style.safetensors")
    from tests.support import tiny_nodes
    tiny_nodes.write_safetensors(theirs, tiny_nodes.lora_state_dict(seed=3))
    before = os.stat(theirs).st_mtime_ns
    msg = error_of(comfy, save_name="their_style", steps=1)
    assert "their_style" in msg and "not written by Train Domain UNet" in msg
    assert os.stat(theirs).st_mtime_ns == before and written("their_style") == ["their_style.safetensors"]
    train(comfy, save_name="twice", mode="full", steps=1)
    msg = error_of(comfy, save_name="twice", mode="lora", steps=1)
    assert "is taken" in msg and "diffusion_models" in msg and written("twice") == ["twice.indomain-state", "twice.safetensors"]


# --- resume, Cancel, divergence, full disk, out of memory --------------------------------------

RESUMABLE = dict(steps=6, checkpoint_every=2, ema_decay=0.9, lr_schedule="cosine", warmup_steps=2, learning_rate=1e-2)


def no_temp_files():
    import folder_paths
    return not [p for kind in ("loras", "diffusion_models") for p in glob.glob(
        os.path.join(folder_paths.models_dir, kind, "**", "*"), recursive=True) if ".tmp-" in os.path.basename(p)]


def file_step(path):
    with safe_open(path, framework="pt") as f:
        return int(f.metadata()["indomain.steps"])


def test_cancel_keeps_the_last_checkpoint_and_resuming_equals_an_uninterrupted_run(comfy, folders, monkeypatch, on_gpu):
    mm, utils = importlib.import_module("comfy.model_management"), importlib.import_module("comfy.utils")
    settings = {**RESUMABLE, "training_dtype": reproducible_dtype(on_gpu)}
    train(comfy, save_name="straight", **settings)
    update = utils.ProgressBar.update_absolute

    def press_cancel_at_step_3(self, value, total=None, preview=None):
        update(self, value, total, preview)
        if value == 3:
            mm.interrupt_current_processing(True)  # what the UI's Cancel button does

    monkeypatch.setattr(utils.ProgressBar, "update_absolute", press_cancel_at_step_3)
    with pytest.raises(HostError) as e:
        comfy.run(train_graph(save_name="stopped", **settings))
    assert e.value.interrupted and e.value.detail["node_id"] == "train"
    monkeypatch.setattr(utils.ProgressBar, "update_absolute", update)
    read = comfy.pack("training.checkpoint").read_state_header
    assert read(saved("stopped.indomain-state")).step == 2
    assert file_step(saved("stopped.safetensors")) == 2
    assert no_temp_files()

    train(comfy, save_name="stopped", **settings)  # run again: resumes at step 3
    assert [t.split()[1] for t in comfy.server.progress_texts("train") if t.startswith("step ")] == ["3/6", "4/6", "5/6", "6/6"]
    a, b = load_file(saved("straight.safetensors")), load_file(saved("stopped.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k


def nan_loss_from_step(comfy, monkeypatch, step: int):
    """From the step-th step on, the loss is NaN (as when training diverges). Returns the undo."""
    eager_training_steps(monkeypatch)
    loop = comfy.pack("training.loop")
    real, calls = loop.denoising_step, []

    def nan_from(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= step else loss

    monkeypatch.setattr(loop, "denoising_step", nan_from)
    return lambda: monkeypatch.setattr(loop, "denoising_step", real)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(comfy, folders, monkeypatch):
    nan_loss_from_step(comfy, monkeypatch, 4)
    msg = error_of(comfy, save_name="diverged", **RESUMABLE)
    assert "diverged at step 4" in msg and "step 2" in msg and "lower" in msg
    assert comfy.pack("training.checkpoint").read_state_header(saved("diverged.indomain-state")).step == 2
    assert file_step(saved("diverged.safetensors")) == 2 and no_temp_files()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_after_a_nan_loss_resuming_with_a_lower_lr_and_another_dtype_continues_from_the_kept_step(
        comfy, folders, monkeypatch, caplog, dtype):
    """What the divergence error advises can be done: the same save_name, a lower learning_rate and a
    steadier training_dtype resume from the kept checkpoint (the fp16 loss scale is dropped)."""
    undo = nan_loss_from_step(comfy, monkeypatch, 4)
    name = f"diverged_{dtype}"
    assert "diverged at step 4" in error_of(comfy, save_name=name, **{**RESUMABLE, "training_dtype": "fp16"})
    undo()

    with caplog.at_level(logging.INFO):
        train(comfy, save_name=name, **{**RESUMABLE, "learning_rate": 1e-3, "training_dtype": dtype})
    assert [t.split()[1] for t in comfy.server.progress_texts("train") if t.startswith("step ")] == ["3/6", "4/6", "5/6", "6/6"]
    assert all(np.isfinite(shown_losses(comfy)))
    assert "with lr 0.001 (saved 0.01)" in caplog.text and f"with precision {dtype} (saved fp16)" in caplog.text
    state = comfy.pack("training.checkpoint").read_state_header(saved(f"{name}.indomain-state"))
    assert state.step == 6 and state.config["lr"] == 1e-3 and state.config["precision"] == dtype
    with safe_open(saved(f"{name}.safetensors"), framework="pt") as f:
        assert f.metadata()["indomain.steps"] == "6" and f.metadata()["indomain.learning_rate"] == "0.001"


def test_resuming_with_another_batch_size_is_refused_naming_what_may_change(comfy, folders):
    train(comfy, save_name="refused_resume", steps=2)
    msg = error_of(comfy, save_name="refused_resume", steps=4, batch_size=1)
    assert "batch_size: saved 2, now 1" in msg and "lr, lr_schedule, warmup_steps, precision may change" in msg


def test_full_disk_keeps_the_last_checkpoint(comfy, folders, monkeypatch):
    checkpoint = comfy.pack("training.checkpoint")
    real, calls = checkpoint.save_file, []

    def disk_fills_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # the state at step 4 (step 2 wrote the state and the model file)
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_up)
    msg = error_of(comfy, save_name="diskfull", **RESUMABLE)
    assert "disk is full" in msg and "diskfull.indomain-state" in msg and "kept" in msg
    assert checkpoint.read_state_header(saved("diskfull.indomain-state")).step == 2
    assert no_temp_files()


def test_out_of_memory_says_what_to_change_for_this_run_in_order(comfy, folders, monkeypatch):
    eager_training_steps(monkeypatch)
    loop = comfy.pack("training.loop")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "denoising_step", oom)
    msg = error_of(comfy, save_name="oom", **RESUMABLE)  # LoRA, batch 2, fp32, no checkpointing
    assert "out of memory while training (CUDA out of memory. Tried to allocate 2.00 GiB)" in msg
    assert msg.index("turn on gradient_checkpointing") < msg.index("gradient_accumulation 2") < msg.index("training_dtype bf16")
    assert "mode lora" not in msg and "adamw8bit" not in msg  # (it is a LoRA run)
    assert written("oom") == []
    msg = error_of(comfy, save_name="oom2", **{**RESUMABLE, "mode": "full", "gradient_checkpointing": True,
                                               "training_dtype": "bf16"})
    assert "gradient_checkpointing" not in msg and "training_dtype" not in msg  # (in place already)
    assert msg.index("gradient_accumulation 2") < msg.index("optimizer adamw8bit") < msg.index("mode lora")


def test_a_recomputation_that_differs_from_the_forward_says_to_turn_checkpointing_off(comfy, folders, monkeypatch):
    """torch's checkpoint refuses a recomputation whose tensors differ from the forward's (SD3.5
    with checkpointing on an H200: docs/BENCHMARKS.md); the node names the input to change."""
    import torch.utils.checkpoint as ckpt

    eager_training_steps(monkeypatch)
    loop = comfy.pack("training.loop")

    def differs(*args, **kwargs):
        raise ckpt.CheckpointError("torch.utils.checkpoint: Recomputed values for the following tensors have different metadata")

    monkeypatch.setattr(loop, "denoising_step", differs)
    msg = error_of(comfy, save_name="recompute", **RESUMABLE)
    assert "gradient_checkpointing" in msg and "off" in msg and "UNet" in msg and "Recomputed values" in msg
    assert written("recompute") == []


def test_with_checkpointing_attention_runs_without_cudnn_and_both_are_restored_after(comfy, folders, monkeypatch):
    """The cure for SD3.5's recomputation error on the H200 (docs/BENCHMARKS.md): while a run with
    gradient checkpointing trains, cuDNN's attention is off in torch's flags and out of the host's
    NVIDIA backend list (set here as the host sets it on an NVIDIA GPU); a run without
    checkpointing keeps it; both are restored after the run."""
    import importlib

    from torch.nn.attention import SDPBackend

    ops = importlib.import_module("comfy.ops")
    eager_training_steps(monkeypatch)
    loop = comfy.pack("training.loop")
    host_list = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    monkeypatch.setattr(ops, "SDPA_BACKEND_PRIORITY", list(host_list), raising=False)
    seen, real = [], loop.denoising_step

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), list(ops.SDPA_BACKEND_PRIORITY)))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "denoising_step", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    train(comfy, "ckpt_on", save_name="ckpt_on", steps=2, gradient_checkpointing=True)
    assert seen and all(s == (False, host_list[1:]) for s in seen), seen
    assert torch.backends.cuda.cudnn_sdp_enabled() and ops.SDPA_BACKEND_PRIORITY == host_list
    seen.clear()
    train(comfy, "ckpt_off", save_name="ckpt_off", steps=2, gradient_checkpointing=False)
    assert seen and all(s == (True, host_list) for s in seen), seen


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (scripts/setup.sh installs it)")
def test_the_8bit_optimizer_trains_in_the_host_and_its_state_keeps_8bit_moments(comfy, folders):
    """optimizer adamw8bit (bitsandbytes, the paper's recipe) in full mode: the run writes its model
    file and a state whose large tensors' moments are stored in 8 bits (tests/test_training_optimizer.py
    has the rest: closeness to AdamW, exact resume, the errors)."""
    train(comfy, "eight", save_name="eight", mode="full", optimizer="adamw8bit", steps=2, checkpoint_every=0)
    with safe_open(saved("eight.indomain-state"), framework="pt") as f:
        eight_bit = [k for k in f.keys() if k.startswith("optim.") and k.endswith(".state1")
                     and f.get_slice(k).get_dtype() == "U8"]
    assert len(eight_bit) >= 10
    assert os.path.exists(saved("eight.safetensors"))


# --- bad input: a clear error naming the input, and nothing written ----------------------------

def test_missing_or_empty_image_folder(comfy, folders):
    import folder_paths
    assert "does not exist" in error_of(comfy, image_folder="no_such_folder", save_name="bad1")
    os.makedirs(os.path.join(folder_paths.get_input_directory(), "empty"), exist_ok=True)
    assert "has no image files" in error_of(comfy, image_folder="empty", save_name="bad1")
    assert "image_folder" in error_of(comfy, image_folder="", save_name="bad1")
    assert written("bad1") == []


def test_image_folder_outside_the_input_directory_is_refused_before_anything_is_written(comfy, folders, tmp_path):
    """Like Load Image, the node reads only inside ComfyUI's input directory (after resolving '..'
    and symlinks): a path outside is an error naming the folder and the allowed root."""
    import folder_paths
    root = os.path.realpath(folder_paths.get_input_directory())
    beside = domain_images(os.path.join(os.path.dirname(root), "beside_input"), sizes=((64, 64), (64, 96)))
    elsewhere = domain_images(str(tmp_path / "elsewhere"), sizes=((64, 64), (64, 96)))
    link = os.path.join(root, "linked_outside")
    if not os.path.islink(link):
        os.symlink(elsewhere, link)
    try:
        for folder in ("../beside_input", elsewhere, "linked_outside", os.path.join(root, "domain", "..", "..", "beside_input"),
                       beside):
            msg = error_of(comfy, image_folder=folder, save_name="escaped")
            assert "outside ComfyUI's input directory" in msg and repr(folder) in msg and root in msg, msg
        assert written("escaped") == []
    finally:  # the host's folders as found: the link would dangle once tmp_path goes, for the tests after this one
        os.unlink(link)


def test_image_folder_by_name_or_by_an_absolute_path_inside_the_input_directory(comfy, folders):
    import folder_paths
    train(comfy, image_folder="domain", steps=1, checkpoint_every=0, save_name="by_name")
    train(comfy, image_folder=os.path.join(folder_paths.get_input_directory(), "domain"), steps=1, checkpoint_every=0,
          save_name="by_path")
    assert written("by_name") == ["by_name.indomain-state", "by_name.safetensors"]
    assert written("by_path") == ["by_path.indomain-state", "by_path.safetensors"]


def test_unreadable_images_are_skipped_with_a_warning_and_none_readable_is_an_error(comfy, folders, caplog):
    import folder_paths
    mixed = domain_images(os.path.join(folder_paths.get_input_directory(), "mixed"), sizes=((64, 64), (64, 96)))
    for name in ("broken.png", "truncated.jpg"):
        with open(os.path.join(mixed, name), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\nnot really")
    with caplog.at_level(logging.WARNING):
        train(comfy, image_folder="mixed", steps=2, save_name="mixed")
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text
    with safe_open(saved("mixed.safetensors"), framework="pt") as f:
        assert f.metadata()["indomain.image_count"] == "2"
    only_bad = os.path.join(folder_paths.get_input_directory(), "only_bad")
    os.makedirs(only_bad, exist_ok=True)
    with open(os.path.join(only_bad, "x.png"), "wb") as f:
        f.write(b"garbage")
    msg = error_of(comfy, image_folder="only_bad", save_name="bad2")
    assert "none of the 1 image file(s)" in msg and "only_bad" in msg
    assert written("bad2") == []


def test_vae_of_another_family_is_refused(comfy, folders):
    prompt = train_graph(save_name="bad3")
    prompt["vae16"] = {"class_type": "TestTinyTAESD", "inputs": {"latent_channels": 16}}
    prompt["train"]["inputs"]["vae"] = ["vae16", 0]
    with pytest.raises(HostError) as e:
        comfy.run(prompt)
    assert "vae" in e.value.exception_message and "16-channel" in e.value.exception_message
    assert written("bad3") == []


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "sub/../../escape", ""])
def test_save_name_cannot_leave_the_model_folder(comfy, folders, name):
    msg = error_of(comfy, save_name=name)
    assert "save name" in msg
    parent = os.path.dirname(folders)
    assert not glob.glob(os.path.join(parent, "escape*")) and not os.path.exists("/tmp/abs.safetensors")


@pytest.mark.parametrize("name", [".", "...", "a/.", "a/..", "sub/", ".hidden", "faces/.safetensors", " / "])
def test_save_name_must_end_in_a_plain_file_name(comfy, folders, name):
    msg = error_of(comfy, save_name=name, steps=1)
    assert "save name" in msg and repr(name.strip()) in msg and "file name" in msg
    hidden = [p for p in glob.glob(os.path.join(os.path.dirname(folders), "**", ".*"), recursive=True) if ".latent-cache" not in p]
    assert hidden == []


def test_save_name_may_have_subfolders(comfy, folders):
    train(comfy, save_name="faces/v1.safetensors", steps=1)
    assert written("faces/v1") == ["v1.indomain-state", "v1.safetensors"]


def test_images_from_an_image_batch_and_a_folder_together(comfy, folders):
    prompt = train_graph(save_name="both", steps=2)
    prompt["img"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 3, "color": 0x336699}}
    prompt["train"]["inputs"]["images"] = ["img", 0]
    comfy.run(prompt)
    with safe_open(saved("both.safetensors"), framework="pt") as f:
        assert f.metadata()["indomain.image_count"] == "9"  # 3 from the batch + 6 in the folder


def test_clip_instead_of_null_conditioning_is_the_same_training(comfy, folders, on_gpu):
    precision = reproducible_dtype(on_gpu)
    train(comfy, save_name="with_null", steps=2, training_dtype=precision)
    prompt = train_graph(save_name="with_clip", steps=2, training_dtype=precision)
    del prompt["train"]["inputs"]["null_conditioning"]
    prompt["train"]["inputs"]["clip"] = ["ckpt", 1]
    comfy.run(prompt)
    a, b = load_file(saved("with_null.safetensors")), load_file(saved("with_clip.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_previews_are_the_domain_model_sampled_by_the_host(comfy, folders):
    """Every preview_every steps a sample is saved; the last one is what KSampler (Domain Guidance)
    gives with the trained model at cfg 0, domain_scale 1 (same seed, 20 Euler steps)."""
    import folder_paths
    train(comfy, mode="full", steps=4, preview_every=2, save_name="previewed", learning_rate=1e-3)
    folder = os.path.join(folder_paths.get_output_directory(), "indomain_previews", "previewed")
    assert sorted(os.listdir(folder)) == ["step_000002.png", "step_000004.png"]
    shown = np.asarray(Image.open(os.path.join(folder, "step_000004.png")), dtype=np.float32)
    prompt = text_to_image(positive="", negative="", cfg=0.0, seed=0, steps=20, width=64, height=64,
                           domain=["dom", 0], extra={"dom": {"class_type": "InDomainUNetLoader", "inputs": {
                               "unet_name": "previewed.safetensors", "lora_strength": 1.0, "base_model": ["ckpt", 0]}}})
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    prompt["cap"]["inputs"]["value"] = ["decode", 0]
    comfy.run(prompt)
    expected = comfy.captured["out"][0].numpy() * 255
    assert np.abs(shown - expected).max() <= 1.0 + 1e-3
    assert shown.std() > 1.0


def test_sdxl_trains_on_its_size_conditioning_and_v_models_on_v(comfy):
    """The loop's inputs come from the base's own classes: SDXL's extra_conds give the empty
    prompt's 'y' for each bucket size; a v-prediction base trains on v."""
    from tests.support.tiny_nodes import UNET_CONFIG

    training = comfy.pack("nodes.training.inputs")
    model_base, supported = importlib.import_module("comfy.model_base"), importlib.import_module("comfy.supported_models")
    config = {**UNET_CONFIG, "context_dim": 2048, "adm_in_channels": 2816, "use_linear_in_transformer": True,
              "num_head_channels": 64, "num_heads": -1}
    sdxl = model_base.SDXL(supported.SDXL(config))
    patcher = type("Patcher", (), {"model": sdxl})()
    pooled = torch.randn(1, 1280)
    host = training.read_host_model(patcher)
    cond_for = training.cond_function(host, torch.randn(1, 77, 2048), {"pooled_output": pooled})
    square, wide = cond_for(1024, 1024), cond_for(768, 1344)
    assert square["context"].shape == (1, 77, 2048) and square["y"].shape == (1, 2816)
    assert torch.equal(square["y"][:, :1280], pooled)  # the pooled empty prompt, then the size embedding
    assert not torch.equal(square["y"], wide["y"])  # the size embedding follows the bucket
    assert host.prediction_type == training.prediction_type(patcher) == "eps" and host.architecture == "SDXL"
    v_model = model_base.BaseModel(supported.SD20(dict(config, context_dim=1024, adm_in_channels=None)),
                                   model_type=model_base.ModelType.V_PREDICTION)
    assert training.prediction_type(type("Patcher", (), {"model": v_model})()) == "v"


def test_a_model_patched_to_v_with_zero_terminal_snr_trains_on_v_and_that_schedule(comfy, folders, monkeypatch):
    """The host's ModelSamplingDiscrete node (v_prediction, zsnr) makes the host sample the model
    as v-prediction on a zero-terminal-SNR schedule: training then uses the same pair, from the
    same model_sampling, and the file says v. Unpatched, the tiny SD1 model stays eps."""
    run = comfy.pack("nodes.training.run")
    real, seen = run.train, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "train", spy)
    prompt = train_graph(save_name="zsnr_v", steps=2, checkpoint_every=0)
    prompt["msd"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["ckpt", 0], "sampling": "v_prediction", "zsnr": True}}
    prompt["train"]["inputs"]["model"] = ["msd", 0]
    comfy.run(prompt)
    train(comfy, save_name="plain_eps", steps=2, checkpoint_every=0)

    (patched, plain), meta = seen, {}
    for name in ("zsnr_v", "plain_eps"):
        with safe_open(saved(f"{name}.safetensors"), framework="pt") as f:
            meta[name] = f.metadata()["indomain.prediction_type"]
    assert patched["prediction_type"] == "v" and meta["zsnr_v"] == "v"
    assert plain["prediction_type"] == "eps" and meta["plain_eps"] == "eps"
    zsnr, sd = patched["alphas_cumprod"], plain["alphas_cumprod"]
    assert zsnr[-1] < 1e-7 and sd[-1] > 1e-3  # zero terminal SNR: alpha_bar ~ 0 at the last step
    assert torch.allclose(zsnr[0], sd[0], rtol=1e-4)  # the rescaling keeps the first step
    assert all(np.isfinite(v) for v in shown_losses(comfy))


def test_a_full_domain_trained_on_a_patched_base_is_sampled_as_it_was_trained(comfy, folders):
    """The full-mode output of a v / zsnr-patched base carries the base's model_sampling (the domain
    term then predicts as the base does); the written file needs the same patch when loaded later."""
    prompt = train_graph(mode="full", save_name="zsnr_full", steps=1, checkpoint_every=0, resume=False)
    prompt["msd"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["ckpt", 0], "sampling": "v_prediction", "zsnr": True}}
    prompt["train"]["inputs"]["model"] = ["msd", 0]
    prompt["cap_base"] = {"class_type": "TestCapture", "inputs": {"value": ["msd", 0], "label": "base"}}
    comfy.run(prompt)
    base, domain = comfy.captured["base"], comfy.captured["trained"]
    assert domain.get_model_object("model_sampling") is base.get_model_object("model_sampling")


def test_models_sampled_as_anything_but_eps_v_or_flow_on_their_schedules_are_refused_naming_them(comfy):
    """x0 and LCM subclass the host's EPS but read the output otherwise; EDM has a continuous
    schedule: training refuses them, naming the model and how it is sampled. Flow (CONST on a flow
    schedule) trains."""
    from tests.support.tiny_nodes import UNET_CONFIG, tiny_model

    training = comfy.pack("nodes.training.inputs")
    patch = comfy.nodes["ModelSamplingDiscrete"]().patch
    assert training.prediction_type(patch(tiny_model(), "eps", False)[0]) == "eps"
    for sampling, described in [("x0", "SD15\\) is sampled as X0 on ModelSamplingDiscrete"),
                                ("lcm", "SD15\\) is sampled as LCM on ModelSamplingDiscreteDistilled")]:
        with pytest.raises(ValueError, match=f"eps- and v-prediction.*{described}"):
            training.prediction_type(patch(tiny_model(), sampling, False)[0])
    model_base, supported = importlib.import_module("comfy.model_base"), importlib.import_module("comfy.supported_models")
    flow = model_base.BaseModel(supported.SD15(dict(UNET_CONFIG)), model_type=model_base.ModelType.FLOW)
    assert training.prediction_type(type("Patcher", (), {"model": flow})()) == "flow"
    edm = model_base.BaseModel(supported.SD15(dict(UNET_CONFIG)), model_type=model_base.ModelType.EDM)
    with pytest.raises(ValueError, match="rectified-flow models .* is sampled as EDM on ModelSamplingContinuousEDM"):
        training.prediction_type(type("Patcher", (), {"model": edm})())


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same_weights(comfy, folders, on_gpu):
    """The host's UNet calls each block's layers one by one, so checkpointing wraps the layers:
    their forward runs twice per step (forward, then recomputed in backward), the math is unchanged:
    the same gradient, and on the CPU the same trained weights. (On a GPU the node's checkpointed run
    takes another attention kernel, nodes/training/differentiable.py, and Adam turns the kernels' rounding
    into different weights: two steps in bf16 on an H200 moved 80 of 144 LoRA tensors by up to 1.8e-3.)"""
    training_node, loop = comfy.pack("nodes.training.inputs"), comfy.pack("training.trainable")
    differentiable = comfy.pack("nodes.training.differentiable")
    from tests.support import tiny_nodes
    unet = tiny_nodes.tiny_model().model.diffusion_model
    names = training_node.read_host_model(tiny_nodes.tiny_model()).checkpointed_blocks
    assert "input_blocks.1.0" in names and "middle_block.1" in names and "output_blocks.0.1" in names
    layer = dict(unet.named_modules())["input_blocks.1.1"]  # a SpatialTransformer
    calls, original = [], layer.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def input_gradient(checkpointing: bool) -> torch.Tensor:
        undo = loop.enable_gradient_checkpointing(unet, names) if checkpointing else (lambda: None)
        try:
            x = start.clone().requires_grad_(True)
            unet(x, t, context=context).float().square().mean().backward()
            return x.grad
        finally:
            undo()

    layer.forward = counted  # beneath the checkpoint wrapper: counts the recomputation too
    try:
        with torch.inference_mode(False):
            differentiable.make_autograd_safe(unet)
            p, generator = next(unet.parameters()), torch.Generator().manual_seed(0)
            start = torch.randn(1, 4, 8, 8, generator=generator).to(p.device, p.dtype)
            t, context = torch.tensor([500.0], device=p.device), torch.randn(1, 77, 768, generator=generator).to(p.device, p.dtype)
            recomputed = input_gradient(checkpointing=True)
            assert len(calls) == 2
            plain = input_gradient(checkpointing=False)
    finally:
        layer.__dict__.pop("forward", None)
        differentiable.give_back_to_host(unet)
    error = ((recomputed.float() - plain.float()).norm() / plain.float().norm()).item()
    assert error <= (1e-2 if on_gpu else 1e-6), error  # GPU: half-precision backward kernels add in a varying order
    if on_gpu:
        return
    train(comfy, save_name="ckpt_on", steps=2, gradient_checkpointing=True)
    train(comfy, save_name="ckpt_off", steps=2, gradient_checkpointing=False)
    a, b = load_file(saved("ckpt_on.safetensors")), load_file(saved("ckpt_off.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_cuda_graphs_train_what_the_eager_steps_train_or_the_log_says_why_not(comfy, folders, caplog, monkeypatch, on_gpu,
                                                                              graphs, mode):
    """LoRA mode at the node's defaults, full mode with cuda_graphs on: on a GPU (under either
    allocator) the steps after two eager ones are replayed graphs and train the eager steps' weights
    (within 1e-3; eager: INDOMAIN_TRAIN_GRAPHS=0, full mode's default); elsewhere (the CPU) the node
    trains exactly as eagerly and the log names why."""
    import folder_paths
    domain_images(os.path.join(folder_paths.get_input_directory(), "square"), sizes=((64, 64),) * 4)  # one bucket
    settings = dict(mode=mode, steps=6, batch_size=2, learning_rate=3e-3, checkpoint_every=0, resume=False,
                    image_folder="square", training_dtype=reproducible_dtype(on_gpu))
    with monkeypatch.context() as m:
        m.setenv("INDOMAIN_TRAIN_GRAPHS", "0")
        with caplog.at_level(logging.INFO):
            train(comfy, save_name=f"eager_{mode}", **settings)
    assert ("INDOMAIN_TRAIN_GRAPHS=0 is set" in caplog.text) == (graphs and mode == "lora")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(comfy, save_name=f"graphed_{mode}", **settings, **({"cuda_graphs": True} if mode == "full" else {}))
    eager, graphed = load_file(saved(f"eager_{mode}.safetensors")), load_file(saved(f"graphed_{mode}.safetensors"))
    assert set(eager) == set(graphed)
    if graphs:
        assert "training graphs: step for batch shape [2, 4, 8, 8] captured" in caplog.text
        assert "failed" not in caplog.text and "without CUDA graphs" not in caplog.text
        for k in eager:
            a, b = graphed[k].float(), eager[k].float()
            assert float((a - b).norm()) <= 1e-3 * max(float(b.norm()), 1e-6), k
    else:
        assert "cuda_graphs: training without CUDA graphs" in caplog.text and "the device is cpu" in caplog.text
        assert "captured" not in caplog.text
        assert all(torch.equal(eager[k], graphed[k]) for k in eager)


def test_lora_mode_takes_cuda_graphs_by_default_full_mode_when_asked_and_each_refusal_says_why(comfy, caplog, monkeypatch):
    """Where the run can have graphs (here: the device's and the host's reasons taken away), LoRA mode
    gets them at the node's defaults and full mode only with cuda_graphs on (its graphs keep their
    memory pool). INDOMAIN_TRAIN_GRAPHS=0, fp16 and accumulation keep the steps eager, logged as a
    warning when cuda_graphs was asked for and as information otherwise."""
    run, TrainConfig = comfy.pack("nodes.training.run"), comfy.pack("training").TrainConfig
    monkeypatch.setattr(run, "cuda_graph_reason", lambda device: None)
    monkeypatch.setattr(run, "host_flag_reason", lambda: None)
    lora, full = TrainConfig(mode="lora"), TrainConfig(mode="full")
    assert run.with_cuda_graphs(lora).cuda_graph and run.with_cuda_graphs(lora, asked=True).cuda_graph
    assert run.with_cuda_graphs(full) is full and run.with_cuda_graphs(full, asked=True).cuda_graph
    for config, why in ((TrainConfig(mode="lora", precision="fp16"), "training_dtype fp16"),
                        (TrainConfig(mode="lora", batch_size=4, gradient_accumulation=2), "gradient_accumulation is 2")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert run.with_cuda_graphs(config) is config
        assert [(r.levelno, why in r.getMessage()) for r in caplog.records] == [(logging.INFO, True)]
    sharded = TrainConfig(mode="full", fsdp=True)
    assert run.with_cuda_graphs(sharded, asked=True) is sharded  # fsdp refuses graphs: eager, and said
    monkeypatch.setenv("INDOMAIN_TRAIN_GRAPHS", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run.with_cuda_graphs(lora, asked=True) is lora
    assert [(r.levelno, "INDOMAIN_TRAIN_GRAPHS=0 is set" in r.getMessage()) for r in caplog.records] == [(logging.WARNING, True)]


def test_full_mode_gives_the_base_back_to_the_host_once_its_copy_is_made(comfy, folders, monkeypatch):
    """Full mode trains a float32 copy and never reads the base's UNet again, so the host unloads it
    (on a GPU: the VRAM of a second, frozen UNet for the training); LoRA mode trains on the base and
    keeps it loaded."""
    mm, train_run = importlib.import_module("comfy.model_management"), comfy.pack("nodes.training.run")
    train_loop, seen = train_run.train, []

    def spy(unet, *args, release_base=None, **kwargs):
        def loaded() -> bool:  # the host holds the UNet being trained's model (under dynamic VRAM: its copy)
            return any(m.model is not None and getattr(m.model.model, "diffusion_model", None) is unet
                       for m in mm.current_loaded_models)

        def watched():
            before = loaded()
            release_base()
            seen.append((before, loaded()))

        seen.append("no release" if release_base is None else "release given")
        return train_loop(unet, *args, release_base=watched if release_base else None, **kwargs)

    monkeypatch.setattr(train_run, "train", spy)
    train(comfy, mode="full", steps=2, save_name="full_released")
    assert seen == ["release given", (True, False)]  # loaded for the copy, unloaded once it was made
    seen.clear()
    train(comfy, mode="lora", steps=2, save_name="lora_kept")
    assert seen == ["no release"]


def host_lists(patcher) -> bool:
    """True if the host's model management lists `patcher`'s model among its loaded models."""
    mm = importlib.import_module("comfy.model_management")
    return any(m.model is not None and m.model.model is patcher.model for m in mm.current_loaded_models)


def test_a_failure_loading_the_non_dynamic_copy_releases_it_from_the_host(comfy, folders, monkeypatch):
    """Under dynamic VRAM training runs on the host's non-dynamic copy of the base, which the host
    lists among its loaded models once it loads it. If loading or preparing the copy fails, the copy
    is released (no longer listed) before the error reaches the user. Where the host has no dynamic
    VRAM (0.8.0) it is emulated: the base counts as dynamic and its copy is the same file loaded
    again as a classic model, as the host's get_non_dynamic_delegate gives it. The failure: making
    the copy's weights usable by autograd, right after the host loaded it."""
    from tests.support import tiny_nodes

    differentiable, base, copies, listed_at_failure = comfy.pack("nodes.training.differentiable"), tiny_nodes.tiny_model(), [], []
    real_copy, dynamic = differentiable.non_dynamic_copy, differentiable.patcher_is_dynamic(base)

    def non_dynamic_copy(model):
        copies.append(real_copy(model) if dynamic else tiny_nodes.load_unet(tiny_nodes.unet_state_dict(0)))
        return copies[-1]

    def fails(unet):
        listed_at_failure.append(host_lists(copies[0]))
        raise RuntimeError("making the copy autograd-safe failed")

    if not dynamic:
        monkeypatch.setattr(differentiable, "patcher_is_dynamic", lambda model: model is base)
    monkeypatch.setattr(differentiable, "non_dynamic_copy", non_dynamic_copy)
    monkeypatch.setattr(differentiable, "make_autograd_safe", fails)
    try:
        assert "making the copy autograd-safe failed" in error_of(comfy, steps=1, save_name="copy_fails", resume=False)
        assert len(copies) == 1 and listed_at_failure == [True]  # the host had loaded the copy when it failed
        assert not host_lists(copies[0])
    finally:
        for copy in copies:
            comfy.pack("nodes.dynamic_vram").release(copy)


def test_weights_cast_to_input_gives_each_layer_back_its_flag_exactly_as_it_was(comfy):
    """Within the block every host layer that did not cast its weights casts them to its input;
    afterwards, also after an error, each layer's comfy_cast_weights is exactly what it was: its
    own value where it had one (as the host's ModelPatcher leaves it), none of its own where only
    its class had one (the class's value shows again). Layers that cast already are left alone."""
    from comfy.ops import disable_weight_init, manual_cast

    differentiable = comfy.pack("nodes.training.differentiable")
    from_class, own, casting = disable_weight_init.Linear(2, 2), disable_weight_init.Linear(2, 2), manual_cast.Linear(2, 2)
    own.comfy_cast_weights = False
    with pytest.raises(RuntimeError, match="inside the block"):
        with differentiable.weights_cast_to_input(torch.nn.Sequential(from_class, own, casting)) as changed:
            assert changed == 2 and from_class.comfy_cast_weights is own.comfy_cast_weights is True
            raise RuntimeError("inside the block")
    assert "comfy_cast_weights" not in from_class.__dict__ and from_class.comfy_cast_weights is False
    assert own.__dict__["comfy_cast_weights"] is False
    assert "comfy_cast_weights" not in casting.__dict__ and casting.comfy_cast_weights is True


def test_full_mode_builds_its_model_from_the_base_config_not_by_detecting_the_weights(comfy, folders, monkeypatch):
    """A base whose saved weights the host cannot detect again (as for a model only its own loader
    knows): the trained MODEL is made from the base's model config, and samples as the written
    file does when the host can read it."""
    from tests.support import tiny_nodes
    tiny_nodes.TestTinyCheckpoint().load("tiny")  # the base, loaded before detection stops working
    detection = importlib.import_module("comfy.model_detection")
    for fn in ("model_config_from_unet", "model_config_from_diffusers_unet", "convert_diffusers_mmdit"):
        monkeypatch.setattr(detection, fn, lambda *args, **kwargs: None)
    node = {"class_type": "InDomainTrainUNet", "inputs": train_graph(
        mode="full", steps=2, learning_rate=1e-3, save_name="undetected")["train"]["inputs"]}
    comfy.run(text_to_image(positive="", negative="", cfg=0.0, steps=3, domain=["train", 0], extra={"train": node}))
    trained = comfy.captured["out"]["samples"]
    assert torch.isfinite(trained).all() and file_step(saved("undetected.safetensors")) == 2

    monkeypatch.undo()
    comfy.run(text_to_image(positive="", negative="", cfg=0.0, steps=3, domain=["dom", 0], extra={"dom": {
        "class_type": "InDomainUNetLoader", "inputs": {"unet_name": "undetected.safetensors", "lora_strength": 1.0,
                                                       "base_model": ["ckpt", 0]}}}))
    assert close(trained, comfy.captured["out"]["samples"], 1e-4)


# --- gradient accumulation, validation, TensorBoard (issue 33) ---------------------------------

def train_with_validation_output(comfy, **options):
    """train_graph with the node's third output (the validation text) captured as well."""
    prompt = train_graph(**options)
    prompt["cap_validation"] = {"class_type": "TestCapture", "inputs": {"value": ["train", 2], "label": "validation"}}
    comfy.run(prompt)
    return comfy.captured["trained"], comfy.captured["trained_loss"], comfy.captured["validation"]


def orange_pixels(comfy, curve: torch.Tensor) -> int:
    """Pixels of the loss curve in the validation series' colour."""
    colour = torch.tensor(comfy.pack("nodes.training.plot").VALIDATION, dtype=torch.float32) / 255
    return int(((curve[0] - colour).abs().max(-1).values < 0.02).sum())


def test_accumulation_and_validation_in_the_node(comfy, folders):
    """batch_size 2 in 2 micro-batches, 2 of the 6 images held out: the node shows and returns the
    validation loss at the start, each checkpoint and the end, records it in the state file, and
    draws it on loss_curve; a run without validation returns "" and draws no orange."""
    _, curve, text = train_with_validation_output(comfy, save_name="acc_val", steps=4, batch_size=2,
                                                   gradient_accumulation=2, validation_share=0.34, checkpoint_every=2)
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 2", "step 4"], text
    shown = [t for t in comfy.server.progress_texts("train") if t.startswith("validation loss")]
    assert [t.split()[-1] for t in shown] == ["0", "2", "4"]
    state = comfy.pack("training.checkpoint").read_state_header(saved("acc_val.indomain-state"))
    assert [s for s, _ in state.validation] == [0, 2, 4] and state.config["validation_share"] == 0.34
    assert [f"step {s}: {v:.6g}" for s, v in state.validation] == lines
    assert len(shown_losses(comfy)) == 4 and orange_pixels(comfy, curve) > 20
    _, plain_curve, plain_text = train_with_validation_output(comfy, save_name="no_val", steps=2, checkpoint_every=0)
    assert plain_text == "" and orange_pixels(comfy, plain_curve) == 0


def test_cuda_graphs_with_accumulation_train_without_them_and_say_why(comfy, caplog):
    run = comfy.pack("nodes.training.run")
    config = comfy.pack("training").TrainConfig(batch_size=4, gradient_accumulation=2)
    with caplog.at_level(logging.WARNING):
        assert run.with_cuda_graphs(config, asked=True) is config
    assert "cuda_graphs: training without CUDA graphs: gradient_accumulation is 2" in caplog.text


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files in `folder`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (scripts/setup.sh installs it)")
def test_tensorboard_logs_what_the_node_shows_and_a_resumed_run_continues_them(comfy, folders, monkeypatch):
    """output/indomain_logs/<save_name>: the per-step loss the node shows, the learning rate of each
    step, images/s and the validation loss, read back with TensorBoard's own reader; a run stopped
    after its checkpoint at step 2 and resumed to step 5 reads as one run of steps 1..5 (the stopped
    run's step 3 purged)."""
    import folder_paths

    mm, utils = importlib.import_module("comfy.model_management"), importlib.import_module("comfy.utils")
    logs = Path(folder_paths.get_output_directory()) / "indomain_logs" / "board"
    settings = dict(save_name="board", steps=5, checkpoint_every=2, warmup_steps=2, learning_rate=1e-3,
                    validation_share=0.34, tensorboard=True, resume=False)
    update = utils.ProgressBar.update_absolute

    def cancel_after_step_3(self, value, total=None, preview=None):
        update(self, value, total, preview)
        if value == 3:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(utils.ProgressBar, "update_absolute", cancel_after_step_3)
    with pytest.raises(HostError):
        comfy.run(train_graph(**settings))
    monkeypatch.setattr(utils.ProgressBar, "update_absolute", update)
    first = scalars(logs)
    assert [s for s, _ in first["train/loss"]] == [1, 2, 3]
    train(comfy, **{**settings, "resume": True})
    shown = shown_losses(comfy)  # steps 3..5 of the resumed run
    got = scalars(logs)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in got["train/loss"][2:]] == pytest.approx(shown, rel=1e-3, abs=1e-4)  # the text shows 4 decimals
    assert [v for _, v in got["train/learning_rate"]] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert all(v > 0 for _, v in got["train/images_per_s"])
    state = comfy.pack("training.checkpoint").read_state_header(saved("board.indomain-state"))
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in got["validation/loss"]] == list(state.validation)
    assert [s for s, _ in got["validation/loss"]] == [0, 2, 4, 5]
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2


def test_tensorboard_without_the_package_is_an_error_naming_it_before_anything_is_written(comfy, folders, monkeypatch):
    """With TensorBoard's writer not importable (simulated), the node says what to install and
    writes nothing."""
    import sys

    import folder_paths

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    msg = error_of(comfy, save_name="no_board", steps=2, tensorboard=True)
    assert "tensorboard" in msg and "pip install tensorboard" in msg
    assert written("no_board") == []
    assert not (Path(folder_paths.get_output_directory()) / "indomain_logs" / "no_board").exists()
