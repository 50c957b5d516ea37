"""The 8-bit AdamW option (TrainConfig.optimizer = "adamw8bit": bitsandbytes' AdamW8bit, the
optimizer of the paper's own recipe): it keeps AdamW's moments in 8 bits, trains as AdamW does,
its state file holds those 8-bit moments and a resumed run ends where an uninterrupted one does;
without bitsandbytes, or with a state of the other optimizer, a clear error and nothing written.

A stand-in UNet 64 channels wide (tests/support/standins.py's TinyUNet): bitsandbytes keeps
tensors under 4096 elements in 32 bits, and the narrow default has none that large.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.support.standins import TinyUNet, run, run_stopped_in_step
from training import read_state_header
from training.checkpoint import ResumeMismatch

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (scripts/setup.sh installs it)")
CONFIG = dict(steps=8, mode="full", lr=3e-3, batch_size=2, checkpoint_every=3, ema_decay=0.9, lr_schedule="cosine",
              warmup_steps=2)


def wide_unet() -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(width=64)


@needs_bnb
def test_8bit_adamw_stores_8bit_moments_and_a_resumed_run_ends_where_the_straight_one_does(tmp_path):
    straight = run(tmp_path / "a", unet=wide_unet(), optimizer="adamw8bit", **CONFIG)
    run_stopped_in_step(tmp_path / "b", 5, unet=wide_unet(), optimizer="adamw8bit", **CONFIG)
    state = tmp_path / "b" / "state.train"
    assert read_state_header(state).step == 3
    with safe_open(os.fspath(state), framework="pt") as f:
        moments = {k: f.get_tensor(k) for k in f.keys() if k.startswith("optim.")}
    eight_bit = [k for k, v in moments.items() if k.endswith((".state1", ".state2")) and v.dtype == torch.uint8]
    assert len(eight_bit) >= 4, sorted(moments)  # ff.net.0/2, to_q, to_out ... in 8 bits
    assert any(k.endswith(".absmax1") for k in moments) and any(k.endswith(".qmap1") for k in moments)

    resumed = run(tmp_path / "b", unet=wide_unet(), optimizer="adamw8bit", **CONFIG)
    assert resumed.start_step == 3 and resumed.step == 8
    assert resumed.losses == straight.losses[3:]
    assert all(torch.equal(resumed.weights[k], straight.weights[k]) for k in straight.weights)
    assert all(torch.equal(resumed.ema_weights[k], straight.ema_weights[k]) for k in straight.ema_weights)


@needs_bnb
def test_8bit_adamw_takes_nearly_the_steps_32bit_adamw_takes(tmp_path):
    """Same data, seed and steps: each tensor's change from the start within 5 % of AdamW's (norm of
    the difference of the two changes over AdamW's change; measured at most 2.1 %), the tensors
    with 8-bit moments further from it than rounding (measured at least 1 %). to_k's bias is left
    out: its gradient is zero in exact arithmetic, so either optimizer's steps there are rounding."""
    config = dict(CONFIG, checkpoint_every=0, ema_decay=0.0)
    start = wide_unet().state_dict()
    adamw = run(tmp_path / "a", unet=wide_unet(), state_name=None, **config)
    eight = run(tmp_path / "b", unet=wide_unet(), state_name=None, optimizer="adamw8bit", **config)
    gaps = {k: float((eight.weights[k] - adamw.weights[k]).norm() / (adamw.weights[k] - start[k]).norm())
            for k in start if k != "to_k.bias"}
    assert max(gaps.values()) < 0.05, gaps
    assert min(gaps[k] for k in start if start[k].numel() >= 4096) > 3e-3, gaps
    assert np.allclose(eight.losses, adamw.losses, rtol=0.05)


def test_without_bitsandbytes_8bit_adamw_is_refused_naming_the_package_before_anything_is_written(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"adamw8bit.*bitsandbytes.*pip install bitsandbytes"):
        run(tmp_path, unet=wide_unet(), optimizer="adamw8bit", **CONFIG)
    assert not (tmp_path / "state.train").exists() and not (tmp_path / "cache").exists()


def test_an_unknown_optimizer_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"optimizer='sgd'; expected one of \('adamw', 'adamw8bit'\)"):
        run(tmp_path, optimizer="sgd", **CONFIG)


@needs_bnb
def test_resuming_with_the_other_optimizer_is_refused_naming_it(tmp_path):
    run(tmp_path, unet=wide_unet(), **dict(CONFIG, steps=3))
    with pytest.raises(ResumeMismatch, match="optimizer: saved None, now 'adamw8bit'"):
        run(tmp_path, unet=wide_unet(), optimizer="adamw8bit", **CONFIG)
