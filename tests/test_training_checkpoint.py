"""training/checkpoint.py: safe save names, atomic files, the one-file training state."""
import os

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import (ResumeMismatch, check_resume_config, read_state_header, restore_state, safe_join,
                                 save_model_file, save_state)


def test_safe_join_allows_names_and_subfolders_inside_the_root(tmp_path):
    assert safe_join(tmp_path, "domain.safetensors") == os.path.join(os.path.realpath(tmp_path), "domain.safetensors")
    assert safe_join(tmp_path, "faces/v1.safetensors").endswith(os.path.join("faces", "v1.safetensors"))


@pytest.mark.parametrize("name, why", [
    ("../escape.safetensors", "leaves the folder"),
    ("a/../../escape.safetensors", "leaves the folder"),
    ("/etc/passwd", "not an absolute path"),
    ("", "is empty"),
    ("   ", "is empty"),
    (".", "leaves the folder"),
])
def test_safe_join_refuses_escapes_absolute_and_empty_names(tmp_path, name, why):
    with pytest.raises(ValueError, match=why):
        safe_join(tmp_path / "root", name)


def test_safe_join_refuses_a_symlink_out_of_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path, tmp_path / "root" / "link")
    with pytest.raises(ValueError, match="leaves the folder"):
        safe_join(tmp_path / "root", "link/x.safetensors")


def test_model_file_is_written_whole_and_read_back(tmp_path):
    path = tmp_path / "out" / "domain.safetensors"
    save_model_file(path, {"a.weight": torch.ones(2, 3)}, {"modelspec.title": "faces"})
    assert torch.equal(load_file(path)["a.weight"], torch.ones(2, 3))
    assert os.listdir(tmp_path / "out") == ["domain.safetensors"]


def test_a_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "domain.safetensors"
    save_model_file(path, {"a": torch.ones(2)})
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(Exception):  # safetensors refuses tensors sharing memory, mid-write
        save_model_file(path, {"a": shared, "b": shared[:2]})
    with pytest.raises(TypeError, match="entry 'x' is a list"):
        save_model_file(path, {"x": [1, 2]})

    def disk_full(fd):  # the temp file is written, then the disk fails
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model_file(path, {"a": torch.zeros(2)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["domain.safetensors"]


def _state(tmp_path, config, steps=2):
    """A state after `steps` AdamW updates of two parameters, with EMA."""
    torch.manual_seed(0)
    params = {"w": torch.nn.Parameter(torch.randn(3, 2)), "b": torch.nn.Parameter(torch.randn(3))}
    opt = torch.optim.AdamW(params.values(), lr=0.1, foreach=True)
    for _ in range(steps):
        sum(p.square().sum() for p in params.values()).backward()
        opt.step()
        opt.zero_grad()
    ema = {k: p.detach() * 0.5 for k, p in params.items()}
    path = tmp_path / "run.state"
    save_state(path, step=steps, config=config, params=params, ema=ema, optimizer=opt, scaler=None)
    return path, params, ema, opt


def test_state_round_trip_restores_weights_ema_and_adamw_moments(tmp_path):
    path, params, ema, opt = _state(tmp_path, {"lr": 0.1})
    header = read_state_header(path)
    assert header.step == 2 and header.config == {"lr": 0.1} and header.params == ["w", "b"]
    fresh = {k: torch.nn.Parameter(torch.zeros_like(p)) for k, p in params.items()}
    fresh_ema = {k: torch.zeros_like(p) for k, p in params.items()}
    fresh_opt = torch.optim.AdamW(fresh.values(), lr=0.1, foreach=True)
    restore_state(header, params=fresh, ema=fresh_ema, optimizer=fresh_opt, scaler=None)
    for k in params:
        assert torch.equal(fresh[k], params[k]) and torch.equal(fresh_ema[k], ema[k])
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_opt.state[fresh[k]][field], opt.state[params[k]][field])
    assert set(load_file(path)) >= {"param.w", "ema.b", "optim.0.exp_avg", "optim.1.exp_avg_sq", "optim.1.step", "step"}


def test_a_different_config_is_refused_naming_the_keys(tmp_path):
    path, *_ = _state(tmp_path, {"lr": 0.1, "seed": 1, "mode": "lora"})
    with pytest.raises(ResumeMismatch, match=r"lr: saved 0.1, now 0.2; seed: saved 1, now 2") as e:
        check_resume_config(read_state_header(path), {"lr": 0.2, "seed": 2, "mode": "lora"})
    assert "mode" not in str(e.value)
    check_resume_config(read_state_header(path), {"lr": 0.1, "seed": 1, "mode": "lora"})


def test_a_state_for_other_parameters_is_refused(tmp_path):
    path, params, ema, opt = _state(tmp_path, {})
    other = {"w": torch.nn.Parameter(torch.zeros(3, 2)), "c": torch.nn.Parameter(torch.zeros(3))}
    with pytest.raises(ResumeMismatch, match=r"only in the file: \['b'\]; only in the model: \['c'\]"):
        restore_state(read_state_header(path), params=other, ema=None, optimizer=torch.optim.AdamW(other.values()), scaler=None)


def test_an_unreadable_state_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "run.state"
    bad.write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="run.state' is not a readable training state"):
        read_state_header(bad)
