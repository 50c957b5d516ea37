"""Full mode sharded with FSDP2 (TrainConfig.fsdp, training/sharded.py), on the CPU with gloo: two
"machines" on this host (two torchrun launches, --nnodes 2, c10d rendezvous on localhost) train
what one process trains; a sharded checkpoint resumes on another number of processes (1 -> 2,
2 -> 1); the model file gathered at each checkpoint is the full weights; what fsdp does not go
with is refused, saying why.

Why the weights agree within a tolerance, not bit for bit: FSDP reduce-scatters each rank's
gradient shard (the sum of 2 ranks' float32 gradients, then / 2) where one process computes the
mean over the whole batch at once: the same numbers summed in another order, about 1e-7 apart.
AdamW divides each update by the root of the gradient's second moment, which magnifies such a
difference where gradients are small; over 4 steps the weights end about 3e-5 apart (relative
norm), hence tol 1e-4 (tests/test_training_distributed.close, the tolerance DDP is held to), and
to_k.bias, whose exact gradient is 0, within a few lr / 10 (there AdamW turns rounding into steps).

The one-process runs here join a process group of one (fsdp needs one: the CLI makes it without
torchrun); the two machines are tests/dist_worker.py under torchrun itself. CPU offload runs with
unpinned memory (pinning needs a GPU). What is left for a GPU: NCCL, pinned offload, bf16 speed,
memory per GPU (docs/GPU_TIER.md, bench/fsdp.py).
"""
import contextlib
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
from tests.support.standins import one_cpu_thread, tiny_unet  # noqa: F401
from tests.test_training_distributed import CONFIG, REPO, close, finished, images, single
from training import TrainConfig, read_state_header
from training.checkpoint import ResumeMismatch
from training.distributed import Ranks
from training.latents import check_shared

FSDP = dict(CONFIG, fsdp=True)
# bf16 compute from fp32 master weights (MixedPrecisionPolicy), offloaded shards, two checkpointed (and
# so separately sharded) blocks, 2 micro-batches per step, 2 of the 8 images held out.
MIXED = dict(FSDP, precision="bf16", cpu_offload=True, gradient_checkpointing=("ff.net", "to_out"),
             gradient_accumulation=2, validation_share=0.25)
BF16 = dict(MIXED, fsdp=False, cpu_offload=False)  # the one-process reference of MIXED


@contextlib.contextmanager
def group_of_one():
    """A gloo process group of one process (this one), as the CLI makes for --fsdp without torchrun."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def alone(root, config: dict, state=None):
    """single(), with fsdp: the run sharded over a world of one."""
    with group_of_one():
        return single(root, config, state)


def two_machines(tmp, jobs: list[dict], timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """The worker under two torchrun launches on this host, as on two machines: --nnodes 2, one
    process each, the c10d rendezvous at localhost (the launch that binds its port hosts it)."""
    spec = tmp / "machines.json"
    spec.write_text(json.dumps(jobs))
    port, env = free_port(), {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                               "--rdzv-id", "indomain-test", "-m", "tests.dist_worker", os.fspath(spec)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    return finished(procs, timeout)


def move_state(state, folder) -> str:
    """A sharded state copied into `folder` with its parts (as one moves a run to other machines)."""
    header = read_state_header(state)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(state, folder / os.path.basename(state))
    shutil.copytree(os.path.join(os.path.dirname(state), os.path.dirname(header.shards)),
                    folder / os.path.dirname(header.shards))
    return os.fspath(folder / os.path.basename(state))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process stops at step 2; two machines run four jobs (a straight run with its model file,
    the one-process state resumed, MIXED, fp16); their state
    resumes on one process to step 6; and the one-process references without fsdp."""
    tmp = tmp_path_factory.mktemp("fsdp")
    folder, cache = images(tmp), os.fspath(tmp / "cache")
    torch.set_num_threads(1)
    one = alone(tmp / "one", {**FSDP, "steps": 2}, os.fspath(tmp / "one" / "one.state"))
    resumed = move_state(tmp / "one" / "one.state", tmp / "resumed")
    job = lambda name, config, state=None, **more: dict(images=folder, cache=cache, config=config,  # noqa: E731
                                                        out=os.fspath(tmp / name), state=state, **more)
    procs = two_machines(tmp, [job("full", FSDP, os.fspath(tmp / "full.state"), model_file=os.fspath(tmp / "full.model")),
                               job("resumed", FSDP, resumed), job("mixed", MIXED, os.fspath(tmp / "mixed.state")),
                               job("fp16", {**FSDP, "precision": "fp16"})])
    got = {name: (load_file(tmp / f"{name}.safetensors"), json.loads((tmp / f"{name}.json").read_text()))
           for name in ("full", "resumed", "mixed", "fp16") if os.path.exists(tmp / f"{name}.json")}
    back = alone(tmp / "back", {**FSDP, "steps": 6}, move_state(tmp / "full.state", tmp / "back"))
    ref = {"full": single(tmp / "ref", FSDP | {"fsdp": False}), "six": single(tmp / "six", {**CONFIG, "steps": 6}),
           "mixed": single(tmp / "bf16", BF16), "fp16": single(tmp / "fp16", {**CONFIG, "precision": "fp16"})}
    return tmp, dict(one=one, back=back, ref=ref, got=got, procs=procs)


def test_two_machines_train_what_one_process_trains(runs):
    tmp, r = runs
    assert [p.returncode for p in r["procs"]] == [0, 0], "\n".join(p.stderr[-3000:] for p in r["procs"])
    weights, info = r["got"]["full"]
    assert info["start_step"] == 0 and info["step"] == 4
    assert np.allclose(info["losses"], r["ref"]["full"].losses, rtol=1e-5)
    assert close(weights, r["ref"]["full"].weights)
    assert not close(weights, tiny_unet().state_dict(), tol=1e-3)
    logs = [p.stderr for p in r["procs"]]
    assert sum("Training (full) on 8 images in 2 buckets, steps 1..4, 2 processes of 2 images each" in s for s in logs) == 1
    assert sum("Saved training state at step 4" in s for s in logs) == 1  # global rank 0 alone writes


def test_the_sharded_state_is_a_file_and_a_folder_of_every_rank_s_part(runs):
    tmp, _ = runs
    header = read_state_header(tmp / "full.state")
    assert header.step == 4 and header.shards.startswith("full.state.shards/step-4-")
    assert os.listdir(tmp / "full.state.shards") == [os.path.basename(header.shards)]  # step 2's folder removed
    parts = sorted(os.listdir(tmp / header.shards))
    assert parts == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert set(load_file(tmp / "full.state")) == {"step"}  # the tensors are in the parts
    assert not [p for p in os.listdir(tmp) if ".tmp" in p]


def test_the_gathered_model_file_is_the_full_weights(runs):
    """At each checkpoint rank 0 writes the gathered deliverable (the EMA: ema_decay 0.9) as one
    safetensors file: every tensor whole, loadable by the UNet, equal to one process's EMA."""
    tmp, r = runs
    model = load_file(tmp / "full.model")
    unet = tiny_unet()
    assert {k: v.shape for k, v in model.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    unet.load_state_dict(model, strict=True)
    assert close(model, r["ref"]["full"].ema_weights)


def test_a_run_stopped_on_one_process_resumes_on_two_machines(runs):
    _, r = runs
    assert r["one"].step == 2
    weights, info = r["got"]["resumed"]
    assert info["start_step"] == 2 and info["step"] == 4
    assert np.allclose(info["losses"], r["ref"]["full"].losses[2:], rtol=1e-5)
    assert close(weights, r["ref"]["full"].weights)


def test_a_run_saved_by_two_machines_resumes_on_one_process(runs):
    _, r = runs
    back, six = r["back"], r["ref"]["six"]
    assert back.start_step == 4 and back.step == 6
    assert np.allclose(back.losses, six.losses[4:], rtol=1e-5)
    assert close(back.weights, six.weights) and close(back.ema_weights, six.ema_weights)


def far(weights: dict, ref: dict) -> dict:
    """Each tensor's distance to ref's, relative to its norm; to_k.bias left out (its exact gradient
    is 0: tests/test_training_distributed.NOISE_ONLY; in half precision it moves by rounding alone)."""
    return {k: float((weights[k] - ref[k]).norm() / ref[k].norm()) for k in weights if k != "to_k.bias"}


def test_bf16_compute_offload_checkpointing_accumulation_and_validation_compose(runs):
    """MIXED against one process in bf16 without fsdp (autocast alone). Both run the matmuls on
    bf16 copies of the fp32 weights; FSDP also keeps each unsharded weight's gradient in bf16 before
    reducing it in fp32 (autocast's cast gives it in fp32): differences of bf16's rounding (3
    significant digits), which AdamW's normalized steps carry into the weights. Seen: every weight
    within 2e-3 of the reference (relative norm; bf16 and fp32 runs are as far apart), where 4 steps
    moved them 2 to 19 %; asserted: 5e-3, and the losses to 1e-3. to_k.bias is left out: its exact
    gradient is 0 (tests/test_training_distributed.NOISE_ONLY), so in bf16 it moves by rounding alone."""
    _, r = runs
    weights, info = r["got"]["mixed"]
    ref = r["ref"]["mixed"]
    assert np.allclose(info["losses"], ref.losses, rtol=1e-3)
    assert max(far(weights, ref.weights).values()) <= 5e-3, far(weights, ref.weights)
    assert [s for s, _ in info["validation"]] == [0, 2, 4]
    assert np.allclose([v for _, v in info["validation"]], [v for _, v in ref.validation], rtol=1e-3)


def test_fp16_with_its_loss_scaler_trains_what_one_process_does(runs):
    """fp16 autocast and the loss scaler (torch's ShardedGradScaler: every rank skips the same
    steps) against one process in fp16 without fsdp: the same losses to 1e-3, the weights as
    MIXED's (half precision's rounding; to_k.bias left out)."""
    _, r = runs
    weights, info = r["got"]["fp16"]
    assert np.allclose(info["losses"], r["ref"]["fp16"].losses, rtol=1e-3)
    assert max(far(weights, r["ref"]["fp16"].weights).values()) <= 5e-3, far(weights, r["ref"]["fp16"].weights)


def test_machines_without_a_shared_cache_folder_are_told_so(tmp_path):
    """The ranks read each other's latent files (cache_latents checks one of each other rank's
    after the exchange); a file another machine wrote that this one cannot see stops the run."""
    (tmp_path / "mine.latent").write_bytes(b"")
    check_shared(Ranks(), os.fspath(tmp_path), [os.fspath(tmp_path / "mine.latent")])
    with pytest.raises(ValueError, match="is not shared by every process: rank 0 cannot read .*theirs.latent.*"
                                         "filesystem every machine mounts at the same path"):
        check_shared(Ranks(), os.fspath(tmp_path), [os.fspath(tmp_path / "theirs.latent")])


@pytest.mark.parametrize("change, message", [
    (dict(mode="lora"), "mode='lora' with fsdp"),
    (dict(shard_optimizer=True), "fsdp shards the optimizer's states already"),
    (dict(cuda_graph=True), "cuda_graph=True with fsdp"),
    (dict(preview_every=2), "preview_every with fsdp"),
    (dict(fsdp=False, cpu_offload=True), "cpu_offload=True needs fsdp=True"),
])
def test_what_fsdp_does_not_go_with_is_refused_saying_why(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{**FSDP, **change}).validate()


def test_8bit_adamw_is_refused_because_its_kernels_do_not_take_sharded_tensors():
    """The refusal's reason, checked: bitsandbytes' AdamW8bit on an FSDP2-sharded layer fails."""
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="bitsandbytes' 8-bit kernels take plain tensors"):
        TrainConfig(**{**FSDP, "optimizer": "adamw8bit"}).validate()
    from torch.distributed.fsdp import fully_shard

    with group_of_one():
        for width, error in ((8, "does not have a sharding strategy registered"), (64, "got mixed torch.Tensor and DTensor")):
            layer = fully_shard(torch.nn.Linear(width, width))  # 64 x 64 = 4096: 8-bit states; 8 x 8: 32-bit
            layer(torch.randn(2, width)).sum().backward()
            with pytest.raises((NotImplementedError, RuntimeError), match=error):
                bnb.optim.AdamW8bit(layer.parameters(), lr=1e-3).step()


def test_a_state_resumes_only_in_its_own_layout(runs, tmp_path):
    """A sharded state resumed without fsdp, and a state of one file resumed with fsdp: refused,
    saying which option to use."""
    tmp, _ = runs
    with pytest.raises(ResumeMismatch, match="resume it with fsdp"):
        single(tmp_path / "a", {**CONFIG, "steps": 6}, move_state(tmp / "full.state", tmp_path / "a"))
    single(tmp_path / "b", {**CONFIG, "steps": 2}, os.fspath(tmp_path / "b.state"))
    with pytest.raises(ResumeMismatch, match="written without fsdp"):
        alone(tmp_path / "c", FSDP, os.fspath(tmp_path / "b.state"))


def test_fsdp_without_a_process_group_says_how_to_run_it(tmp_path):
    with pytest.raises(ValueError, match="fsdp needs a process group: run the trainer under torchrun"):
        single(tmp_path, FSDP)


def test_the_command_line_makes_a_group_of_one_for_fsdp_without_torchrun(monkeypatch):
    """`train_domain.py --fsdp` run plainly (one GPU, e.g. with --cpu-offload): a process group of
    one process, rank 0 of 1; without --fsdp none."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_domain_cli", os.path.join(REPO, "tools", "train_domain.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for name in ("WORLD_SIZE", "MASTER_ADDR", "RANK"):
        monkeypatch.delenv(name, raising=False)
    args = cli.parse_args(["--images", "x", "--save-name", "y", "--mode", "full", "--cpu", "--fsdp", "--cpu-offload"])
    assert (args.fsdp, args.cpu_offload) == (True, True)
    assert cli.start_distributed(cli.parse_args(["--images", "x", "--save-name", "y"])) == (0, 1)
    assert not torch.distributed.is_initialized()
    try:
        assert cli.start_distributed(args) == (0, 1)
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    finally:
        torch.distributed.destroy_process_group()
