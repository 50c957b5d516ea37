"""training/loop.py: train() end to end with the stand-ins (tiny UNet, fake VAE) on synthetic images.

Every run here is fp32 on CPU unless a test says otherwise; `run` (tests/support/standins.py) trains
on four 64x64 images at resolution 64 with batch size 2.
"""
import glob
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support import standins as support
from tests.support.standins import (FakeVAE, Interrupted, cond_for, image_folder, one_cpu_thread, run,  # noqa: F401
                                     run_stopped_in_step, sd_alphas_cumprod, tiny_unet, write_image)
from training import ResumeMismatch, TrainConfig, TrainingDiverged, learning_rate, read_state_header, train
from training.latents import CachedImage, LatentSet
from training.plan import sample_batch


def _rel_close(a: dict, b: dict, tol=1e-6) -> bool:
    return set(a) == set(b) and all(float((a[k] - b[k]).norm()) <= tol * max(float(a[k].norm()), 1e-12) for k in a)


def _tmp_files(root) -> list:
    return glob.glob(os.path.join(root, "**", "*.tmp*"), recursive=True)


@pytest.mark.parametrize("mode, lr, prediction_type", [("full", 3e-3, "eps"), ("lora", 3e-2, "eps"), ("full", 3e-3, "v")])
def test_loss_falls_on_a_small_synthetic_set(tmp_path, mode, lr, prediction_type):
    result = run(tmp_path, steps=40, mode=mode, lr=lr, lora_rank=4, batch_size=4, prediction_type=prediction_type, state_name=None)
    assert len(result.losses) == 40
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_run_resumed_from_step_k_ends_where_an_uninterrupted_run_does(tmp_path, mode):
    config = dict(steps=8, mode=mode, lr=3e-3, lora_rank=4, checkpoint_every=3, ema_decay=0.9,
                  lr_schedule="cosine", warmup_steps=2)
    straight = run(tmp_path / "a", **config)

    run_stopped_in_step(tmp_path / "b", 5, **config)
    assert read_state_header(tmp_path / "b" / "state.train").step == 3

    resumed = run(tmp_path / "b", **config)
    assert resumed.start_step == 3 and resumed.step == 8
    assert np.allclose(resumed.losses, straight.losses[3:], rtol=1e-6)
    assert _rel_close(resumed.weights, straight.weights)
    assert _rel_close(resumed.ema_weights, straight.ema_weights)


def test_an_interrupt_keeps_the_last_complete_checkpoint_and_leaves_no_temp_files(tmp_path):
    unet = tiny_unet()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), cond_for(64, 64)["context"]
    before = unet(x, t, context=ctx)
    calls = []
    def interrupt_in_step_5_before_its_update():
        calls.append(1)
        if len(calls) == 4 + 2 * 4 + 2:  # 4 images cached, 2 checks per step: the 2nd check of step 5
            raise Interrupted()
    with pytest.raises(Interrupted):
        run(tmp_path, unet=unet, steps=10, mode="lora", checkpoint_every=2, flip=False, check_interrupt=interrupt_in_step_5_before_its_update)
    header = read_state_header(tmp_path / "state.train")
    assert header.step == 4
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "state.train").values())
    assert _tmp_files(tmp_path) == []
    assert torch.equal(unet(x, t, context=ctx), before)  # the adapters are off the host's UNet again
    assert run(tmp_path, unet=unet, steps=10, mode="lora", checkpoint_every=2, flip=False).start_step == 4


def test_a_nan_loss_raises_training_diverged_and_leaves_the_checkpoint_byte_identical(tmp_path):
    unet = tiny_unet()
    run(tmp_path, unet=unet, steps=2)
    saved = (tmp_path / "state.train").read_bytes()
    unet.nan = True  # from now on the model outputs NaN
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the loss is nan.*state.train' is unchanged \(step 2\)"):
        run(tmp_path, unet=unet, steps=6, checkpoint_every=1)
    assert (tmp_path / "state.train").read_bytes() == saved
    assert _tmp_files(tmp_path) == []


def test_a_huge_learning_rate_diverges_and_the_last_checkpoint_stays_finite(tmp_path):
    with pytest.raises(TrainingDiverged) as e:
        run(tmp_path, steps=10, lr=1e30, checkpoint_every=1)
    assert read_state_header(tmp_path / "state.train").step == e.value.step - 1
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "state.train").values())
    assert _tmp_files(tmp_path) == []


def test_resuming_with_another_config_is_refused_naming_the_keys(tmp_path):
    run(tmp_path, steps=2, lr=1e-3)
    saved = (tmp_path / "state.train").read_bytes()
    with pytest.raises(ResumeMismatch, match=r"batch_size: saved 2, now 1; seed: saved 0, now 3"):
        run(tmp_path, steps=4, lr=2e-3, batch_size=1, seed=3)
    write_image(tmp_path / "images" / "new.png", 64, 64, seed=99)
    with pytest.raises(ResumeMismatch, match=r"image_set: saved .*num_images: saved 4, now 5"):
        run(tmp_path, steps=4, lr=1e-3)
    assert (tmp_path / "state.train").read_bytes() == saved


@pytest.mark.parametrize("before, after", [("fp16", "bf16"), ("fp32", "fp16"), ("fp16", "fp16")])
def test_lr_schedule_and_precision_may_change_on_resume(tmp_path, before, after):
    """A diverged run is continued with a lower lr and a steadier precision (the error's advice); the
    fp16 loss scale is kept where both runs are fp16, else dropped or started afresh."""
    run(tmp_path, steps=2, lr=1e-2, precision=before)
    resumed = run(tmp_path, steps=4, lr=1e-3, lr_schedule="cosine", warmup_steps=1, precision=after)
    assert resumed.start_step == 2 and resumed.step == 4 and all(math.isfinite(v) for v in resumed.losses)
    header = read_state_header(tmp_path / "state.train")
    assert header.config["lr"] == 1e-3 and header.config["precision"] == after and header.config["lr_schedule"] == "cosine"
    assert ("scaler.scale" in load_file(tmp_path / "state.train")) == (after == "fp16")


def test_a_finished_run_returns_at_once_and_a_longer_one_continues_it(tmp_path):
    first = run(tmp_path, steps=4)
    steps_seen, vae = [], FakeVAE()
    again = run(tmp_path, vae=vae, steps=4, on_progress=lambda info: steps_seen.append(info.stage))
    assert again.losses == [] and again.start_step == again.step == 4
    assert vae.calls == 0 and "train" not in steps_seen
    assert _rel_close(again.weights, first.weights, tol=0)
    longer = run(tmp_path, steps=6)
    assert longer.start_step == 4 and longer.step == 6 and len(longer.losses) == 2


def test_full_mode_trains_a_copy_and_returns_the_unets_state_dict(tmp_path):
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = run(tmp_path, unet=unet, steps=3, ema_decay=0.5, state_name=None)
    assert list(result.weights) == list(before) and list(result.ema_weights) == list(before)
    assert not _rel_close(result.weights, before)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())  # the host's UNet is untouched
    assert all(p.requires_grad for p in unet.parameters())
    assert run(tmp_path, unet=unet, steps=1, state_name=None).ema_weights is None  # ema_decay 0: no EMA


def _warm_decay(step: int, decay: float) -> float:
    """The EMA warm-up written out: decay_t = min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1 + step) / (10 + step))


def test_ema_warms_up_so_the_initial_weights_fade_within_a_short_run():
    """After N updates the EMA's weight on its starting value is prod_t decay_t: with the warm-up
    about 1e-4 after 1000 steps at 0.999, not 0.999^1000 = 37 %."""
    from training.trainable import ema_decay_at, ema_init, ema_update

    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11) and ema_decay_at(100, 0.999) == pytest.approx(101 / 110)
    assert ema_decay_at(10**6, 0.999) == 0.999  # the warm-up ends where (1 + t) / (10 + t) reaches the decay
    param = {"w": torch.nn.Parameter(torch.ones(3))}  # the initial value 1, then 0 at every step
    ema = ema_init(param)
    with torch.no_grad():
        param["w"].zero_()
    for step in range(1, 1001):
        ema_update(ema, param, ema_decay_at(step, 0.999))
    weight_on_initial = math.prod(_warm_decay(t, 0.999) for t in range(1, 1001))
    assert torch.allclose(ema["w"], torch.full((3,), weight_on_initial), rtol=1e-4)
    assert weight_on_initial < 1e-3 < 0.999**1000


def test_the_saved_ema_is_the_warmed_up_average_of_the_weights_of_every_step(tmp_path):
    """The run's EMA equals the EMA computed by hand over the weights after each step (the same
    seed trains the same weights with or without EMA), starting from the UNet's own weights."""
    unet = tiny_unet()
    trajectory = []
    run(tmp_path / "a", unet=unet, steps=5, checkpoint_every=1, on_checkpoint=lambda step, w: trajectory.append({k: v.clone() for k, v in w.items()}))
    ema = {k: v.double() for k, v in unet.state_dict().items()}
    for step, weights in enumerate(trajectory, 1):
        d = _warm_decay(step, 0.999)
        ema = {k: d * ema[k] + (1 - d) * weights[k].double() for k in ema}
    result = run(tmp_path / "b", unet=unet, steps=5, ema_decay=0.999)
    assert _rel_close(result.ema_weights, {k: v.float() for k, v in ema.items()}, tol=1e-5)
    start = unet.state_dict()
    moved = {k: float((result.ema_weights[k] - start[k]).norm() / (result.weights[k] - start[k]).norm()) for k in start}
    assert min(moved.values()) > 0.5, moved  # the EMA has left the starting weights (without warm-up: 0.5 %)


def test_lora_mode_returns_comfyui_lora_tensors_and_gives_the_unet_back(tmp_path):
    unet = tiny_unet()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), cond_for(64, 64)["context"]
    before = unet(x, t, context=ctx)
    result = run(tmp_path, unet=unet, steps=3, mode="lora", lora_rank=4, lora_alpha=2.0, state_name=None)
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in result.weights)
    assert float(result.weights["diffusion_model.to_q.alpha"]) == 2.0
    assert result.weights["diffusion_model.to_q.lora_up.weight"].abs().sum() > 0  # it trained
    assert torch.equal(unet(x, t, context=ctx), before)
    assert all(p.requires_grad for p in unet.parameters())


def test_progress_and_preview_are_reported(tmp_path):
    infos, previews = [], []
    run(tmp_path, steps=4, preview_every=2, on_progress=infos.append, on_preview=lambda step, model: previews.append((step, model)), state_name=None)
    cache = [i for i in infos if i.stage == "cache"]
    steps = [i for i in infos if i.stage == "train"]
    assert [i.step for i in cache] == [1, 2, 3, 4] and all(i.total == 4 for i in cache)
    assert [i.step for i in steps] == [1, 2, 3, 4] and all(i.total == 4 for i in steps)
    assert all(math.isfinite(i.loss) and i.images_per_s > 0 and i.eta_s >= 0 for i in steps)
    assert steps[-1].eta_s == 0
    assert [s for s, _ in previews] == [2, 4] and all(isinstance(m, torch.nn.Module) for _, m in previews)


@pytest.mark.parametrize("mode, ema", [("lora", 0.0), ("full", 0.9)])
def test_the_hosts_samples_get_each_checkpoints_weights_with_the_module_as_before_training(tmp_path, mode, ema):
    """on_samples gets, at each checkpoint and the end, the very weights on_checkpoint gets (the
    EMA's with EMA), and the module being trained computes as the base does within the call (LoRA:
    the adapters suspended); training is not changed by it. A resumed run calls it first with the
    state's weights (resumed=True), then at its own checkpoints."""
    unet = tiny_unet()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), cond_for(64, 64)["context"]
    base = unet(x, t, context=ctx).detach()
    written, sampled = {}, []

    def on_samples(step, weights, resumed):
        sampled.append((step, resumed, {k: v.clone() for k, v in weights.items()}, torch.equal(unet(x, t, context=ctx), base)))

    config = dict(steps=6, mode=mode, lora_rank=4, lr=3e-2 if mode == "lora" else 3e-3, checkpoint_every=4, ema_decay=ema)
    result = run(tmp_path / "a", unet=unet, on_samples=on_samples,
                 on_checkpoint=lambda step, weights: written.update({step: {k: v.clone() for k, v in weights.items()}}),
                 **config)
    assert [(s, r) for s, r, _, _ in sampled] == [(4, False), (6, False)]
    assert all(_rel_close(w, written[s], tol=0) for s, _, w, _ in sampled)
    assert all(same for *_, same in sampled)  # the host's module as before training, in every call
    plain = run(tmp_path / "b", **config)
    assert _rel_close(result.weights, plain.weights, tol=0)

    sampled.clear()
    run(tmp_path / "a", unet=unet, on_samples=on_samples, **{**config, "steps": 10})
    assert [(s, r) for s, r, _, _ in sampled] == [(6, True), (8, False), (10, False)]
    assert _rel_close(sampled[0][2], written[6], tol=0)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    plain = run(tmp_path / "a", steps=3, state_name=None)
    checkpointed = run(tmp_path / "b", steps=3, gradient_checkpointing=("ff.net", "proj_out"), state_name=None)
    assert _rel_close(checkpointed.weights, plain.weights)
    with pytest.raises(ValueError, match=r"no submodule named \['middle_block'\]"):
        run(tmp_path / "c", steps=1, gradient_checkpointing=("middle_block",), state_name=None)


def test_under_cudamallocasync_checkpointing_recomputes_whole_blocks_and_trains_the_same_weights(tmp_path, monkeypatch):
    """The GPU failure this emulates: under cudaMallocAsync (ComfyUI's default allocator on NVIDIA)
    the recomputation's early stop came back as "conv2d returned NULL without setting an
    exception" (LoRA, bf16, ComfyUI 0.33 on an H200). There the recomputation runs without it."""
    import torch.utils.checkpoint as tuc

    import training.trainable as trainable

    calls = []
    real = trainable.checkpoint
    monkeypatch.setattr(trainable, "checkpoint", lambda *a, **k: calls.append(k["early_stop"]) or real(*a, **k))
    plain = run(tmp_path / "a", steps=3, mode="lora", state_name=None)
    monkeypatch.setattr(trainable, "cuda_malloc_async", lambda: True)
    whole = run(tmp_path / "b", steps=3, mode="lora", gradient_checkpointing=("ff.net", "proj_out"), state_name=None)
    assert calls and not any(calls)
    assert _rel_close(whole.weights, plain.weights)
    assert tuc.checkpoint is real  # the library's function itself is untouched


def test_undoing_gradient_checkpointing_gives_each_module_back_the_forward_it_had():
    """The undo restores exactly what was there: a module's own instance `forward` (a wrapper set by
    the host or another pack) comes back as that same object; a module without one is left without
    one (the class's forward again)."""
    from training.trainable import enable_gradient_checkpointing

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    wrapped, plain = model[0], model[1]

    def wrapper(*args, **kwargs):
        return torch.nn.Linear.forward(wrapped, *args, **kwargs)

    wrapped.forward = wrapper
    undo = enable_gradient_checkpointing(model, ["0", "1"])
    assert wrapped.forward is not wrapper and "forward" in plain.__dict__  # both checkpointed
    undo()
    assert wrapped.__dict__["forward"] is wrapper
    assert "forward" not in plain.__dict__


def test_compiled_forward_trains_the_same_weights(tmp_path):
    """`compile` (torch.compile, issue 5's speed option) changes speed, not the result; a run may
    be resumed with it switched."""
    plain = run(tmp_path / "a", steps=3, state_name=None)
    compiled = run(tmp_path / "b", steps=3, compile=True, state_name=None)
    assert _rel_close(compiled.weights, plain.weights, tol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_under_autocast(tmp_path, precision):
    result = run(tmp_path, steps=3, precision=precision, mode="lora")
    assert all(math.isfinite(v) for v in result.losses)
    if precision == "fp16":  # the loss scaler's state is part of the training state
        assert "scaler.scale" in load_file(tmp_path / "state.train")


def test_an_image_batch_trains_like_a_folder(tmp_path):
    images = torch.rand(3, 48, 80, 3)
    result = train(tiny_unet(), images, encode=FakeVAE(), vae_id="v", cond_for=cond_for, alphas_cumprod=sd_alphas_cumprod(),
                   prediction_type="eps", config=TrainConfig(steps=2, resolution=128, precision="fp32"), cache_dir=tmp_path)
    assert len(result.losses) == 2


def test_bad_config_values_are_refused_naming_the_field(tmp_path):
    for field, value, expected in [("lr", 0.0, "lr=0.0"), ("mode", "dora", "mode='dora'"), ("ema_decay", 1.0, "ema_decay=1.0"),
                                   ("resolution", 500, "resolution=500"), ("precision", "fp8", "precision='fp8'")]:
        with pytest.raises(ValueError, match=expected):
            run(tmp_path, **{field: value})


def _latent_set(buckets):
    images = [CachedImage(f"im{i}", b, torch.full((4, b[0] // 8, b[1] // 8), float(i)), torch.full((4, b[0] // 8, b[1] // 8), -float(i)))
              for i, b in enumerate(buckets)]
    return LatentSet(images, "hash", 0)


def test_each_batch_comes_from_one_bucket_and_depends_only_on_seed_and_step():
    data = _latent_set([(64, 64), (64, 128), (64, 64), (64, 128), (128, 64)])
    config = TrainConfig(batch_size=2, seed=5)
    for step in range(1, 30):
        batch = sample_batch(data, step, config, 1000)
        assert batch.x0.shape[-2:] == (batch.bucket[0] // 8, batch.bucket[1] // 8)
        again = sample_batch(data, step, config, 1000)
        assert torch.equal(batch.x0, again.x0) and torch.equal(batch.t, again.t) and torch.equal(batch.eps, again.eps)
    flips = {float(sample_batch(data, s, config, 1000).x0.flatten()[0]) < 0 for s in range(1, 30)}
    assert flips == {True, False}  # both orientations get used
    no_flip = TrainConfig(batch_size=2, seed=5, flip=False)
    assert all(sample_batch(data, s, no_flip, 1000).x0.min() >= 0 for s in range(1, 30))
    assert not torch.equal(sample_batch(data, 1, config, 1000).eps, sample_batch(data, 2, config, 1000).eps)


def test_learning_rate_warms_up_linearly_then_stays_or_follows_a_cosine():
    constant = TrainConfig(steps=10, lr=1.0, warmup_steps=4)
    assert [learning_rate(s, constant) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = TrainConfig(steps=10, lr=1.0, warmup_steps=0, lr_schedule="cosine")
    lrs = [learning_rate(s, cosine) for s in range(1, 11)]
    assert lrs[0] == 1.0 and all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 0.03


def test_a_state_file_from_before_the_epoch_order_resumes_with_it(tmp_path, caplog):
    """0.3.0's state files have no "sampler" in their config: they resume (with the epoch order), saying so."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    run(tmp_path, steps=2)
    path = tmp_path / "state.train"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    del config["sampler"]
    save_file(load_file(path), path, metadata={**meta, "config": json.dumps(config, sort_keys=True)})
    with caplog.at_level("INFO", logger="training.loop"):
        resumed = run(tmp_path, steps=3)
    assert resumed.start_step == 2 and "written before the epoch order" in caplog.text


# The stand-ins the training tests run on (tests/support/standins.py).
def test_tiny_unet_has_the_hosts_signature_and_output_shape():
    unet = support.tiny_unet()
    x = torch.randn(2, 4, 8, 16)
    assert unet(x, torch.tensor([0.0, 999.0]), context=support.CONTEXT.expand(2, -1, -1), y=None).shape == x.shape


def test_fake_vae_downsamples_by_8_to_4_channels():
    assert support.FakeVAE()(torch.rand(1, 64, 128, 3)).shape == (1, 4, 8, 16)


def test_the_memory_savers_come_in_order_and_leave_out_what_the_run_already_does():
    from training.config import memory_savers

    full = TrainConfig(mode="full", batch_size=12, precision="fp32", resolution=1024, cuda_graph=True)
    assert [s.split(" (")[0] for s in memory_savers(full)] == [
        "turn on gradient_checkpointing", "turn off cuda_graphs", "gradient_accumulation 2", "optimizer adamw8bit",
        "training_dtype bf16", "mode lora", "a lower resolution"]
    assert "micro-batches of 6 images" in memory_savers(full)[2]
    # the micro-batch split by its smallest factor: 9 images -> 3 micro-batches of 3
    assert "gradient_accumulation 3 (the same batch in micro-batches of 3 images)" in memory_savers(
        TrainConfig(batch_size=9))
    assert "gradient_accumulation 4 (" in " ".join(memory_savers(TrainConfig(batch_size=8, gradient_accumulation=2)))
    done = TrainConfig(mode="lora", batch_size=4, gradient_accumulation=4, gradient_checkpointing=("input_blocks",),
                       resolution=256)
    assert memory_savers(done) == []  # nothing left: the node then says a GPU with more memory
    sharded = memory_savers(TrainConfig(mode="full", fsdp=True, batch_size=2), cli=True)
    assert sharded == ["leave out --no-gradient-checkpointing", "--gradient-accumulation 2 (the same batch in micro-batches "
                       "of 1 image)", "--cpu-offload (the shards and optimizer states in CPU memory)", "a lower --resolution"]
