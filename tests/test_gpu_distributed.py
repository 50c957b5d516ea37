"""Training under torchrun on two GPUs with NCCL (the GPU tier, `--gpu` on a machine with two CUDA
GPUs such as the lent nvidia-h200-x2): what tests/test_training_distributed.py asserts with gloo on
the CPU, here with the backend and kernels users run.

A second identical one-GPU run repeats the first bit for bit (measured on the H200), but two GPUs
compute each step from two half batches (other convolution algorithms, TF32 rounding, NCCL's order
of summation), so a two-GPU run is compared with the one-GPU run within a tolerance: the relative
norm of each tensor's difference, 1e-2 in full mode and 5e-2 for a LoRA (its up-projections start
at zero and move about lr per step, where AdamW's first steps, about lr * sign(gradient), turn a
rounding difference in a near-zero gradient into a full step: measured 2.6e-3 and 2.1e-2 after 4
steps); losses within 1e-3 relative (measured 2.5e-5). The measured differences go to
$GPU_DIST_REPORT (JSON) when set; docs/GPU_TIER.md records them.

A failing rank under NCCL: the other rank waits in a collective that will not complete, and
torchrun (the launcher users run) stops it; the run must still end with one clear message and the
last checkpoint kept. These tests start the workers through torchrun for that reason.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_training_distributed import CONFIG, LORA, REPO, WORKER, images
from tests.support.standins import FakeVAE, cond_for, sd_alphas_cumprod, tiny_unet
from training import TrainConfig, read_state_header, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (e.g. the lent nvidia-h200-x2)")]

# Relative norm of the difference of any tensor to the one-GPU run's, per mode (module docstring).
TOLERANCE = {"full": 1e-2, "lora": 5e-2}
REPORT: dict = {}


def torchrun(tmp, jobs: list[dict], timeout: float = 240) -> subprocess.CompletedProcess:
    spec = tmp / f"jobs-{len(list(tmp.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *WORKER, os.fspath(spec)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DIST_WORKER_NCCL": "1", "OMP_NUM_THREADS": "1"})


def one_gpu(root, config: dict, state: str | None = None):
    return train(tiny_unet().cuda(), images(root), encode=FakeVAE(), vae_id="fake-vae", cond_for=cond_for,
                 alphas_cumprod=sd_alphas_cumprod(), prediction_type="eps", config=TrainConfig(**config),
                 cache_dir=os.fspath(root / "cache"), state_path=state, device="cuda:0")


def difference(a: dict, b: dict) -> float:
    """The largest relative difference (norm of the difference over the norm) over the tensors.
    to_k's bias is left out: its gradient is zero in exact arithmetic (softmax ignores a shift of
    every key), so AdamW turns rounding into steps of up to lr / 10 (test_training_distributed)."""
    assert set(a) == set(b)
    return max(float((a[k].float().cpu() - b[k].float().cpu()).norm()) / max(float(b[k].float().norm()), 1e-12)
               for k in a if not k.endswith("to_k.bias"))


def loss_difference(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


def record(name: str, value: float) -> float:
    REPORT[name] = value
    if os.environ.get("GPU_DIST_REPORT"):
        with open(os.environ["GPU_DIST_REPORT"], "w") as f:
            json.dump(REPORT, f, indent=1)
    return value


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nccl")
    folder, cache = images(tmp), os.fspath(tmp / "cache")
    ref = {"full": one_gpu(tmp / "ref_full", CONFIG, os.fspath(tmp / "ref_full.state")),
           "again": one_gpu(tmp / "ref_again", CONFIG),
           "lora": one_gpu(tmp / "ref_lora", LORA)}
    one_gpu(tmp / "one", {**CONFIG, "steps": 2}, os.fspath(tmp / "resumed.state"))  # stopped at step 2 on one GPU
    job = lambda name, config, state=None: dict(images=folder, cache=cache, config=config, out=os.fspath(tmp / name),  # noqa: E731
                                                state=None if state is None else os.fspath(tmp / state))
    out = torchrun(tmp, [job("full", CONFIG, "full.state"), job("lora", LORA),
                         job("sharded", {**CONFIG, "shard_optimizer": True}), job("resumed", CONFIG, "resumed.state")])
    assert out.returncode == 0, out.stderr[-4000:]
    got = {name: (load_file(tmp / f"{name}.safetensors"), json.loads((tmp / f"{name}.json").read_text()))
           for name in ("full", "lora", "sharded", "resumed")}
    return tmp, ref, got, out


def test_one_gpu_twice_differs_by_less_than_the_tolerance(runs):
    """The yardstick: what a second identical one-GPU run gives."""
    _, ref, _, _ = runs
    assert record("one_gpu_repeat", difference(ref["again"].weights, ref["full"].weights)) < TOLERANCE["full"] / 10


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_gpus_train_what_one_gpu_trains_with_the_same_global_batch(runs, mode):
    tmp, ref, got, out = runs
    weights, info = got[mode]
    assert info["start_step"] == 0 and info["step"] == 4
    assert record(f"{mode}_losses", loss_difference(info["losses"], ref[mode].losses)) < 1e-3
    assert record(f"{mode}_weights", difference(weights, ref[mode].weights)) < TOLERANCE[mode]
    untouched = tiny_unet().state_dict() if mode == "full" else {k: 0 * v for k, v in weights.items()}
    assert difference(untouched, ref[mode].weights) > 5 * TOLERANCE[mode]  # training moved the weights further
    assert "2 processes of 2 images each" in out.stderr


def test_a_sharded_optimizer_on_two_gpus_trains_the_same_weights(runs):
    _, ref, got, _ = runs
    assert record("sharded_weights", difference(got["sharded"][0], ref["full"].weights)) < TOLERANCE["full"]


def test_a_run_stopped_on_one_gpu_resumes_on_two_and_ends_where_the_straight_run_does(runs):
    _, ref, got, _ = runs
    weights, info = got["resumed"]
    assert info["start_step"] == 2 and info["step"] == 4
    assert record("resume_1_to_2_losses", loss_difference(info["losses"], ref["full"].losses[2:])) < 1e-3
    assert record("resume_1_to_2_weights", difference(weights, ref["full"].weights)) < TOLERANCE["full"]


def test_a_run_saved_by_two_gpus_resumes_on_one(runs, tmp_path):
    tmp, _, _, _ = runs
    (tmp_path / "state").write_bytes((tmp / "full.state").read_bytes())
    resumed = one_gpu(tmp_path, {**CONFIG, "steps": 6}, os.fspath(tmp_path / "state"))
    straight = one_gpu(tmp_path / "straight", {**CONFIG, "steps": 6})
    assert resumed.start_step == 4
    assert record("resume_2_to_1_losses", loss_difference(resumed.losses, straight.losses[4:])) < 1e-3
    assert record("resume_2_to_1_weights", difference(resumed.weights, straight.weights)) < TOLERANCE["full"]


@pytest.mark.parametrize("kind", ["oom", "nan", "interrupt"])
def test_a_failing_or_interrupted_rank_stops_both_gpus_with_one_message_and_the_last_checkpoint_kept(tmp_path, kind):
    """Rank 1 fails in step 3 (out of memory, a NaN loss) or sees a Ctrl-C there: the run ends
    (under NCCL torchrun stops the rank left waiting after an out-of-memory), one line says what
    happened, and the state file stays at step 2."""
    job = dict(images=images(tmp_path), cache=os.fspath(tmp_path / "cache"), out=os.fspath(tmp_path / "out"),
               state=os.fspath(tmp_path / "state"), config={**CONFIG, "steps": 6, "checkpoint_every": 1},
               fail={"rank": 1, "call": 3, "kind": kind})
    out = torchrun(tmp_path, [job], timeout=180)
    assert out.returncode != 0, out.stderr[-3000:]
    ours = [line for line in out.stderr.splitlines() if line.startswith(("ERROR [rank", "WARNING [rank"))]
    assert len(ours) == 1, out.stderr[-4000:]
    if kind == "oom":
        assert ours[0].startswith("ERROR [rank 1/2] rank 1 of 2 failed: OutOfMemoryError: CUDA out of memory")
    elif kind == "nan":
        assert ours[0].startswith("ERROR [rank 0/2] training diverged at step 3: the loss is not finite (rank 1: nan)")
    else:
        assert ours[0].startswith("WARNING [rank 0/2] stopped") and "every rank stopped at the same step" in ours[0]
    assert read_state_header(tmp_path / "state").step == 2
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "state").values())
    assert glob.glob(os.fspath(tmp_path / "*.tmp*")) == [] and not os.path.exists(tmp_path / "out.json")
