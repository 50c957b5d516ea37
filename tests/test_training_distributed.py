"""Training under torchrun (training/distributed.py, loop.py): N processes with the gloo backend on
the CPU train what one process trains with the same global batch; a run resumes on another
number of processes; a failing rank stops every rank with one message and the last checkpoint kept.

The workers are tests/dist_worker.py (the stand-ins of tests/support/standins.py: tiny UNet, fake
VAE, one thread each), started as torchrun starts them. The single-process references run here.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support.live_server import free_port
from tests.support.standins import FakeVAE, cond_for, one_cpu_thread, sd_alphas_cumprod, tiny_unet, write_image  # noqa: F401
from training import TrainConfig, read_state_header, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = ["-m", "tests.dist_worker"]  # run from REPO
# Two buckets at resolution 128 (128x128 and 64x128 px), a global batch of 4: 2 images per process.
CONFIG = dict(steps=4, mode="full", lr=3e-3, resolution=128, precision="fp32", batch_size=4, ema_decay=0.9,
              checkpoint_every=2, warmup_steps=1)
LORA = dict(CONFIG, mode="lora", lora_rank=4, lr=3e-2)
# Two micro-batches of 2 images: 1 image per process in each (2 processes x 1 x 2 = the global batch of 4);
# 2 of the 8 images held out, their loss measured at steps 0, 2 and 4.
ACCUMULATED = dict(CONFIG, gradient_accumulation=2, validation_share=0.25)


def images(root) -> str:
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        write_image(folder / f"square{i}.png", 128, 128, seed=i)
        write_image(folder / f"wide{i}.png", 192, 96, seed=10 + i)
    return os.fspath(folder)


def launch(tmp, jobs: list[dict], world: int = 2, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """The worker on `world` processes, each with torchrun's environment; waits for every one."""
    spec = tmp / f"jobs-{free_port()}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *WORKER, os.fspath(spec)], cwd=REPO, env={**env, "RANK": str(k), "LOCAL_RANK": str(k)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(world)]
    return finished(procs, timeout)


def finished(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Each process's output once it exits (within `timeout` each); none is left running, also on error."""
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:  # never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def single(root, config: dict, state: str | None = None):
    """The same training in this process: one rank."""
    return train(tiny_unet(), images(root), encode=FakeVAE(), vae_id="fake-vae", cond_for=cond_for,
                 alphas_cumprod=sd_alphas_cumprod(), prediction_type="eps", config=TrainConfig(**config),
                 cache_dir=os.fspath(root / "cache"), state_path=state)


# to_k's bias has no gradient in exact arithmetic (softmax ignores a shift shared by every key), so
# AdamW, which divides by the gradient's size, turns float rounding into steps of up to about lr/10.
NOISE_ONLY = ("to_k.bias", "diffusion_model.to_k.bias")


def close(a: dict, b: dict, tol=1e-4) -> bool:
    """Every tensor within tol of b (relative norm: AdamW divides by small gradients, so the float
    rounding of a sum in another order can grow to about 3e-5 in 4 steps); a noise-only tensor
    within 6 steps of lr / 10."""
    def near(k):
        if k in NOISE_ONLY or k.endswith(tuple("." + n for n in NOISE_ONLY)):
            return float((a[k] - b[k]).abs().max()) <= 6 * CONFIG["lr"] / 10
        return float((a[k] - b[k]).norm()) <= tol * max(float(b[k].norm()), 1e-12)
    return set(a) == set(b) and all(near(k) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of two processes running six jobs (full, LoRA, full with a sharded optimizer,
    a resume of a one-process state at step 2, full with gradient accumulation and validation,
    full sharded with FSDP2), and the one-process references."""
    tmp = tmp_path_factory.mktemp("distributed")
    folder, cache = images(tmp), os.fspath(tmp / "cache")
    torch.set_num_threads(1)
    ref = {"full": single(tmp / "ref_full", CONFIG, os.fspath(tmp / "ref_full.state")),
           "lora": single(tmp / "ref_lora", LORA),
           "validated": single(tmp / "ref_validated", {**CONFIG, "validation_share": 0.25}),
           "accumulated": single(tmp / "ref_accumulated", ACCUMULATED)}
    single(tmp / "one", {**CONFIG, "steps": 2}, os.fspath(tmp / "resumed.state"))  # stopped at step 2 on one process
    job = lambda name, config, state=None: dict(images=folder, cache=cache, config=config, out=os.fspath(tmp / name),  # noqa: E731
                                                state=None if state is None else os.fspath(tmp / state))
    procs = launch(tmp, [job("full", CONFIG, "full.state"), job("lora", LORA),
                         job("sharded", {**CONFIG, "shard_optimizer": True}, "sharded.state"),
                         job("resumed", CONFIG, "resumed.state"), job("accumulated", ACCUMULATED, "accumulated.state"),
                         job("fsdp", {**CONFIG, "fsdp": True}, "fsdp.state")])
    assert [p.returncode for p in procs] == [0, 0], "\n".join(p.stderr[-3000:] for p in procs)
    got = {name: (load_file(tmp / f"{name}.safetensors"), json.loads((tmp / f"{name}.json").read_text()))
           for name in ("full", "lora", "sharded", "resumed", "accumulated", "fsdp")}
    return tmp, ref, got, procs


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(runs, mode):
    tmp, ref, got, _ = runs
    weights, info = got[mode]
    assert info["start_step"] == 0 and info["step"] == 4
    assert np.allclose(info["losses"], ref[mode].losses, rtol=1e-5)
    assert close(weights, ref[mode].weights)
    assert not close(weights, tiny_unet().state_dict() if mode == "full" else {k: 0 * v for k, v in weights.items()}, tol=1e-3)


def test_the_same_global_batch_trains_the_same_weights_at_one_and_two_processes_with_accumulation(runs):
    """batch_size 4 as 2 micro-batches of 2, each split over 2 processes (1 image each), trains what
    one process with one batch of 4 trains, and what one process with the same 2 micro-batches
    trains; the held-out images' losses are the one process's."""
    tmp, ref, got, procs = runs
    weights, info = got["accumulated"]
    assert "2 processes of 1 images each, 2 micro-batches of 2 images per step, 2 images held out" in procs[0].stderr
    assert np.allclose(info["losses"], ref["validated"].losses, rtol=1e-5)
    assert np.allclose(info["losses"], ref["accumulated"].losses, rtol=1e-5)
    assert close(weights, ref["validated"].weights) and close(weights, ref["accumulated"].weights)
    steps, losses = zip(*info["validation"])
    assert list(steps) == [0, 2, 4] == [s for s, _ in ref["accumulated"].validation]
    assert np.allclose(losses, [v for _, v in ref["accumulated"].validation], rtol=1e-5)
    assert losses[-1] != losses[0]  # it measured the weights being trained
    assert [list(v) for v in read_state_header(tmp / "accumulated.state").validation] == info["validation"]


def test_rank_0_alone_reports_progress_and_writes_one_state_file(runs):
    tmp, _, _, procs = runs
    assert "Training (full) on 8 images in 2 buckets, steps 1..4, 2 processes of 2 images each" in procs[0].stderr
    assert "Training (" not in procs[1].stderr
    assert read_state_header(tmp / "full.state").step == 4
    assert glob.glob(os.fspath(tmp / "*.tmp*")) == []


def test_a_sharded_optimizer_trains_the_same_weights_and_saves_the_whole_state(runs):
    """ZeroRedundancyOptimizer: each rank keeps half of AdamW's moments; rank 0 gathers them into
    the same state file one process writes."""
    tmp, ref, got, _ = runs
    assert close(got["sharded"][0], ref["full"].weights)
    sharded, plain = load_file(tmp / "sharded.state"), load_file(tmp / "ref_full.state")
    assert set(sharded) == set(plain)
    noise = read_state_header(tmp / "ref_full.state").params.index("to_k.bias")  # its moments are float noise
    keys = [k for k in plain if not k.startswith(f"optim.{noise}.") and not k.endswith("to_k.bias")]
    assert all(torch.allclose(sharded[k].double(), plain[k].double(), rtol=1e-4, atol=1e-7) for k in keys)
    assert torch.equal(sharded[f"optim.{noise}.step"], plain[f"optim.{noise}.step"])


def test_fsdp_trains_what_ddp_trains(runs):
    """Full mode sharded with FSDP2 (tests/test_fsdp.py has the rest) against DDP, both on 2
    processes: the same losses (to 1e-5) and weights (close: DDP all-reduces the whole gradient,
    FSDP reduce-scatters each rank's shard of it; float32 sums of the same numbers, grouped
    otherwise, that AdamW's normalized steps carry to about 3e-5 in 4 steps)."""
    _, _, got, _ = runs
    (weights, info), (ddp, ddp_info) = got["fsdp"], got["full"]
    assert np.allclose(info["losses"], ddp_info["losses"], rtol=1e-5)
    assert close(weights, ddp)


def test_a_run_stopped_on_one_process_resumes_on_two_and_ends_where_the_straight_run_does(runs):
    _, ref, got, _ = runs
    weights, info = got["resumed"]
    assert info["start_step"] == 2 and info["step"] == 4
    assert np.allclose(info["losses"], ref["full"].losses[2:], rtol=1e-5)
    assert close(weights, ref["full"].weights)


def test_a_run_saved_by_two_processes_resumes_on_one(runs, tmp_path):
    tmp, _, _, _ = runs
    shutil.copy(tmp / "full.state", tmp_path / "state")
    resumed = single(tmp_path, {**CONFIG, "steps": 6}, os.fspath(tmp_path / "state"))
    straight = single(tmp_path / "straight", {**CONFIG, "steps": 6})
    assert resumed.start_step == 4 and np.allclose(resumed.losses, straight.losses[4:], rtol=1e-5)
    assert close(resumed.weights, straight.weights)


@pytest.mark.parametrize("kind", ["oom", "nan"])
def test_a_failing_rank_stops_both_with_one_message_and_the_last_checkpoint_kept(tmp_path, kind):
    """Rank 1 fails in step 3 (out of memory in its forward, or a NaN loss): both processes end
    by themselves, one ERROR line says what failed where, and the state file stays at step 2."""
    job = dict(images=images(tmp_path), cache=os.fspath(tmp_path / "cache"), out=os.fspath(tmp_path / "out"),
               state=os.fspath(tmp_path / "state"), config={**CONFIG, "steps": 6, "checkpoint_every": 1},
               fail={"rank": 1, "call": 3, "kind": kind})
    procs = launch(tmp_path, [job], timeout=60)
    assert all(p.returncode == 1 for p in procs), [(p.returncode, p.stderr[-2000:]) for p in procs]
    errors = [line for p in procs for line in p.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, "\n".join(p.stderr for p in procs)
    if kind == "oom":
        assert "[rank 1/2] rank 1 of 2 failed: OutOfMemoryError: CUDA out of memory" in errors[0]
    else:
        assert "[rank 0/2] training diverged at step 3: the loss is not finite (rank 1: nan)" in errors[0]
    assert "every rank stopped" in errors[0] or kind == "nan"
    assert read_state_header(tmp_path / "state").step == 2
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "state").values())
    assert glob.glob(os.fspath(tmp_path / "*.tmp*")) == [] and not os.path.exists(tmp_path / "out.json")




def test_ctrl_c_on_one_rank_stops_both_at_the_same_step_with_the_last_checkpoint_kept(tmp_path):
    """A Ctrl-C seen by rank 1 during step 3's forward (torchrun forwards a Ctrl-C to every rank;
    here only one sees it, the harder case): both processes stop at the end of that step with exit code 130, the step is not
    applied, one WARNING says how to resume, and the state file stays at step 2."""
    job = dict(images=images(tmp_path), cache=os.fspath(tmp_path / "cache"), out=os.fspath(tmp_path / "out"),
               state=os.fspath(tmp_path / "state"), config={**CONFIG, "steps": 6, "checkpoint_every": 1},
               fail={"rank": 1, "call": 3, "kind": "interrupt"})
    procs = launch(tmp_path, [job], timeout=60)
    assert [p.returncode for p in procs] == [130, 130], [(p.returncode, p.stderr[-2000:]) for p in procs]
    stops = [line for p in procs for line in p.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert len(stops) == 1 and stops[0].startswith("WARNING [rank 0/2] stopped"), "\n".join(p.stderr for p in procs)
    assert "every rank stopped at the same step" in stops[0] and "resume" in stops[0]
    assert read_state_header(tmp_path / "state").step == 2
    assert glob.glob(os.fspath(tmp_path / "*.tmp*")) == [] and not os.path.exists(tmp_path / "out.json")
