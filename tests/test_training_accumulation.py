"""TrainConfig.gradient_accumulation (training/loop.py): each optimizer step's global batch of
batch_size images computed in k micro-batches of batch_size / k, their gradients added up.

Every run is fp32 on CPU unless a test says otherwise; `run` (tests/support/standins.py) trains
the tiny UNet on four 64x64 images at resolution 64.
"""
import math

import numpy as np
import pytest
import torch

from tests.support.standins import Interrupted, TinyUNet, one_cpu_thread, run, run_stopped_in_step  # noqa: F401
from training import TrainingDiverged, read_state_header

# to_k's bias has no gradient in exact arithmetic (softmax ignores a shift shared by every key): its
# gradient is float rounding, which AdamW (dividing by the gradient's size) turns into steps of about lr.
NOISE_ONLY = ("to_k.bias", "diffusion_model.to_k.bias")


def close(a: dict, b: dict, tol: float, lr: float) -> bool:
    """Every tensor within tol of b (relative norm); a noise-only tensor within a few steps of lr."""
    def near(k):
        if k.endswith(NOISE_ONLY):
            return float((a[k] - b[k]).abs().max()) <= 10 * lr
        return float((a[k] - b[k]).norm()) <= tol * max(float(b[k].norm()), 1e-12)
    return set(a) == set(b) and all(near(k) for k in a)


def gradients(monkeypatch):
    """Records every parameter's gradient (unscaled: divided by the fp16 loss scale) at each update."""
    import training.loop as loop

    seen, real = [], loop._update

    def spy(run_, step):
        scale = run_.scaler.get_scale() if run_.scaler.is_enabled() else 1.0
        seen.append({k: p.grad.detach().clone() / scale for k, p in run_.params.items()})
        return real(run_, step)

    monkeypatch.setattr(loop, "_update", spy)
    return seen


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_of_b_train_what_one_batch_of_k_times_b_trains(tmp_path, monkeypatch, mode, k):
    """The gradient of each update is the global batch's (not k times it: AdamW alone would hide a
    factor), the losses are the global batch's, and the weights agree after 6 steps."""
    config = dict(steps=6, mode=mode, lr=3e-3 if mode == "full" else 3e-2, lora_rank=4, batch_size=4, state_name=None)
    grads = gradients(monkeypatch)
    one = run(tmp_path / "one", **config)
    one_grads = list(grads)
    grads.clear()
    parts = run(tmp_path / "parts", gradient_accumulation=k, **config)
    assert len(grads) == len(one_grads) == 6
    for mine, theirs in zip(grads, one_grads):
        for name in theirs:
            if not name.endswith(NOISE_ONLY):
                assert float((mine[name] - theirs[name]).norm()) <= 1e-5 * float(theirs[name].norm()), name
    assert np.allclose(parts.losses, one.losses, rtol=1e-6)
    assert close(parts.weights, one.weights, 1e-5, config["lr"])
    smaller = run(tmp_path / "smaller", **{**config, "batch_size": 4 // k})  # what one micro-batch alone trains
    assert not close(smaller.weights, one.weights, 1e-2, config["lr"])


def test_the_fp16_loss_scale_applies_to_each_micro_batch_and_is_updated_once_per_step(tmp_path, monkeypatch):
    """fp16 with accumulation: the unscaled gradient is the global batch's (within fp16's rounding)
    and the scaler's state after the run is the one-batch run's (one update per optimizer step)."""
    from safetensors.torch import load_file

    config = dict(steps=3, mode="lora", lr=3e-2, lora_rank=4, batch_size=4, precision="fp16")
    grads = gradients(monkeypatch)
    run(tmp_path / "one", **config)
    one_grads = list(grads)
    grads.clear()
    run(tmp_path / "parts", gradient_accumulation=2, **config)
    for mine, theirs in zip(grads, one_grads):
        for name in theirs:
            if not name.endswith(NOISE_ONLY):
                assert float((mine[name] - theirs[name]).norm()) <= 2e-2 * float(theirs[name].norm()), name
    one, parts = load_file(tmp_path / "one" / "state.train"), load_file(tmp_path / "parts" / "state.train")
    assert torch.equal(one["scaler.scale"], parts["scaler.scale"])
    assert torch.equal(one["scaler.growth_tracker"], parts["scaler.growth_tracker"]) and int(parts["scaler.growth_tracker"]) == 3


def test_a_run_with_accumulation_resumed_from_step_k_ends_bit_for_bit_where_an_uninterrupted_run_does(tmp_path):
    config = dict(steps=7, mode="full", lr=3e-3, batch_size=4, gradient_accumulation=2, checkpoint_every=3,
                  ema_decay=0.9, lr_schedule="cosine", warmup_steps=2)
    straight = run(tmp_path / "a", **config)
    run_stopped_in_step(tmp_path / "b", 5, **config)
    assert read_state_header(tmp_path / "b" / "state.train").step == 3
    resumed = run(tmp_path / "b", **config)
    assert resumed.start_step == 3 and resumed.losses == straight.losses[3:]
    assert all(torch.equal(resumed.weights[k], straight.weights[k]) for k in straight.weights)
    assert all(torch.equal(resumed.ema_weights[k], straight.ema_weights[k]) for k in straight.ema_weights)


def test_accumulation_may_change_on_resume_and_is_not_recorded(tmp_path):
    """A run that ran out of memory goes on with more, smaller micro-batches: the same images,
    noise and mean gradient. State files keep the config they had (no gradient_accumulation key)."""
    config = dict(steps=6, mode="full", lr=3e-3, batch_size=4, checkpoint_every=3)
    straight = run(tmp_path / "a", **config)
    run(tmp_path / "b", **{**config, "steps": 3})
    assert "gradient_accumulation" not in read_state_header(tmp_path / "b" / "state.train").config
    resumed = run(tmp_path / "b", gradient_accumulation=4, **config)
    assert resumed.start_step == 3 and np.allclose(resumed.losses, straight.losses[3:], rtol=1e-6)
    assert close(resumed.weights, straight.weights, 1e-5, config["lr"])


class NanAtCall(TinyUNet):
    """The tiny UNet (tiny_unet(0)'s weights) whose `call`-th forward returns NaN."""

    def __init__(self, call: int):
        torch.manual_seed(0)
        super().__init__()
        self.call, self.calls = call, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = super().forward(*args, **kwargs)
        return out * float("nan") if self.calls == self.call else out


def test_a_nan_in_the_second_micro_batch_refuses_the_step_and_keeps_the_checkpoint(tmp_path):
    """Step 3's second micro-batch (the 6th forward) is NaN: the run stops at step 3 before any
    update, the state file from step 2 is unchanged."""
    config = dict(steps=6, mode="full", batch_size=4, gradient_accumulation=2, checkpoint_every=1)
    run(tmp_path, unet=NanAtCall(0), **{**config, "steps": 2})
    saved = (tmp_path / "state.train").read_bytes()
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the loss is nan.*unchanged \(step 2\)"):
        run(tmp_path, unet=NanAtCall(2), **config)  # resumed at 2: its 2nd forward is step 3's 2nd micro-batch
    assert (tmp_path / "state.train").read_bytes() == saved


def test_an_interrupt_between_micro_batches_stops_before_the_update(tmp_path):
    """Alone, the host's interrupt is checked before each micro-batch and before the update: a
    Cancel between micro-batches leaves no half-applied step, and the run resumes from the last
    checkpoint to the uninterrupted run's weights."""
    config = dict(steps=4, mode="full", lr=3e-3, batch_size=4, gradient_accumulation=2, checkpoint_every=1, flip=False)
    straight = run(tmp_path / "a", **config)
    calls = []

    def interrupt_between_step_3s_micro_batches():
        calls.append(1)
        if len(calls) == 4 + 3 * 2 + 2:  # 4 images cached, 3 checks per step: the 2nd check of step 3
            raise Interrupted()

    with pytest.raises(Interrupted):
        run(tmp_path / "b", check_interrupt=interrupt_between_step_3s_micro_batches, **config)
    assert read_state_header(tmp_path / "b" / "state.train").step == 2
    resumed = run(tmp_path / "b", **config)
    assert resumed.start_step == 2 and all(torch.equal(resumed.weights[k], straight.weights[k]) for k in straight.weights)


def test_bad_accumulation_values_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"gradient_accumulation=0; expected an integer >= 1"):
        run(tmp_path, gradient_accumulation=0)
    with pytest.raises(ValueError, match=r"batch_size=6; expected a multiple of gradient_accumulation=4"):
        run(tmp_path, batch_size=6, gradient_accumulation=4)
    with pytest.raises(ValueError, match=r"cuda_graph=True with gradient_accumulation=2"):
        run(tmp_path, batch_size=4, gradient_accumulation=2, cuda_graph=True)
    assert not (tmp_path / "state.train").exists()


def test_progress_reports_the_global_batchs_images_and_each_updates_learning_rate(tmp_path):
    infos = []
    run(tmp_path, steps=4, batch_size=4, gradient_accumulation=2, warmup_steps=2, lr=1e-3, on_progress=infos.append,
        state_name=None)
    steps = [p for p in infos if p.stage == "train"]
    assert [p.lr for p in steps] == [5e-4, 1e-3, 1e-3, 1e-3]
    assert all(math.isfinite(p.loss) and p.images_per_s > 0 for p in steps)
