"""One process of the distributed training tests (tests/test_training_distributed.py), started as
torchrun starts a worker: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment (or by
torchrun itself: tests/test_fsdp.py's two "machines").

    python tests/dist_worker.py JOBS.json

Joins a gloo process group (or, with DIST_WORKER_NCCL=1, an NCCL one with each rank on GPU
LOCAL_RANK: tests/test_gpu_distributed.py), then runs each job of JOBS.json in turn: training.train with the
stand-ins of tests/support/standins.py (tiny UNet, fake VAE) on job["images"], one thread. Rank 0
writes each job's result (weights, losses, start step) to job["out"]. A job's "fail" makes one
rank's UNet fail at one of its calls: {"rank": 1, "call": 3, "kind": "oom" | "nan" | "interrupt"}
("interrupt": a Ctrl-C arrives on that rank during that call; the CLI's signal handler sets the host's
interrupt flag, which check_interrupt then raises). job["cache"] may name the rank ("cache{rank}": a
folder per rank, as machines without a shared filesystem have). A job's "model_file" is the path where each
checkpoint's deliverable weights are written (the loop's on_checkpoint, as the node writes its model
file: training.checkpoint.save_model_file). The exit code
and the log follow the headless trainer's (training.distributed.report_stop).
"""
import json
import logging
import os
import sys

import torch

from safetensors.torch import save_file  # noqa: E402

from tests.support.standins import FakeVAE, TinyUNet, cond_for, sd_alphas_cumprod  # noqa: E402
from training import TrainConfig, train  # noqa: E402
from training.checkpoint import save_model_file  # noqa: E402
from training.distributed import leave, ranks, report_stop  # noqa: E402

log = logging.getLogger("dist_worker")
CTRL_C = False  # set by a "fail" of kind "interrupt"


class FailingUNet(TinyUNet):
    """The tiny UNet that fails at its `call`-th forward on one rank (out of memory, or NaN)."""

    def __init__(self, fail: dict | None):
        torch.manual_seed(0)  # the weights of tiny_unet(0)
        super().__init__()
        self.fail, self.calls = fail, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = super().forward(*args, **kwargs)
        if self.fail and self.fail["rank"] == ranks().rank and self.calls >= self.fail["call"]:
            if self.fail["kind"] == "interrupt":  # a Ctrl-C arrives during this forward
                global CTRL_C
                CTRL_C = True
                return out
            if self.fail["kind"] == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            return out * float("nan")
        return out


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if NCCL else torch.device("cpu")


NCCL = os.environ.get("DIST_WORKER_NCCL") == "1"


def run_job(job: dict) -> None:
    r = ranks()
    def check_interrupt():  # what the CLI's signal handler makes the host's interrupt check do
        if CTRL_C:
            raise KeyboardInterrupt

    model_file = job.get("model_file")
    result = train(FailingUNet(job.get("fail")).to(device()), job["images"], encode=FakeVAE(), vae_id="fake-vae", cond_for=cond_for,
                   alphas_cumprod=sd_alphas_cumprod(), prediction_type="eps", config=TrainConfig(**job["config"]),
                   cache_dir=job["cache"].format(rank=r.rank), state_path=job.get("state"), device=device(), check_interrupt=check_interrupt,
                   on_checkpoint=(lambda step, weights: save_model_file(model_file, weights)) if model_file else None)
    if r.main:
        save_file({k: v.detach().cpu().contiguous() for k, v in result.weights.items()}, job["out"] + ".safetensors")
        with open(job["out"] + ".json", "w") as f:
            json.dump({"losses": result.losses, "start_step": result.start_step, "step": result.step,
                       "validation": result.validation}, f)


def main() -> int:
    torch.set_num_threads(1)
    if NCCL:  # as tools/train_domain.py starts it on GPUs
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=local)
    else:
        torch.distributed.init_process_group("gloo")
    r = ranks()
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s [rank {r.rank}/{r.world}] %(message)s")
    try:
        for job in json.load(open(sys.argv[1])):
            run_job(job)
    except BaseException as e:
        return report_stop(r, e, log, "The last complete checkpoint is kept.")
    return 0


if __name__ == "__main__":
    leave(main())  # as the headless trainer leaves under torchrun (training.distributed.leave)
