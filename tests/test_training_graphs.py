"""TrainConfig.cuda_graph (training/graphed.py): the steps' forward and backward replayed as CUDA
graphs train what the eager steps train, and the option refuses what it cannot do.

The GPU tests (marked gpu) train the stand-in UNet of tests/test_training_support.py on the GPU
with and without the graphs; the CPU tests check the refusals.
"""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_training_support import run, tiny_unet


@pytest.mark.parametrize("options, words", [
    (dict(precision="fp16"), "precision fp16"),
    (dict(compile=True), "compile"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path, options, words):
    with pytest.raises(ValueError, match=f"cuda_graph=True with {words}"):
        run(tmp_path, cuda_graph=True, **options)


def test_cuda_graph_on_the_cpu_is_refused_naming_the_device_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device and one process \(the device is cpu\)"):
        run(tmp_path, cuda_graph=True)
    assert not (tmp_path / "state.train").exists() and not (tmp_path / "cache").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("mode, ckpt", [("lora", False), ("full", False), ("lora", True), ("full", True)])
def test_graphed_steps_train_what_eager_steps_train(tmp_path, caplog, mode, ckpt, needs_graphs):
    """bf16, 8 steps on one bucket: 2 eager steps, a capture, then replays. The losses and the
    weights equal the eager run's within 1e-3 (the same kernels on the same inputs)."""
    config = dict(steps=8, mode=mode, lr=3e-3, lora_rank=4, precision="bf16", state_name=None,
                  gradient_checkpointing=("ff.net", "proj_out") if ckpt else ())
    eager = run(tmp_path / "a", unet=tiny_unet().cuda(), **config)
    with caplog.at_level(logging.INFO, logger="training.graphed"):
        graphed = run(tmp_path / "b", unet=tiny_unet().cuda(), cuda_graph=True, **config)
    assert any("captured" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not any("failed" in r.getMessage() for r in caplog.records)
    assert np.allclose(graphed.losses, eager.losses, rtol=1e-3), (graphed.losses, eager.losses)
    for k in eager.weights:
        a, b = graphed.weights[k].float().cpu(), eager.weights[k].float().cpu()
        assert float((a - b).norm()) <= 1e-3 * max(float(b.norm()), 1e-6), k


@pytest.mark.gpu
@pytest.mark.parametrize("allocator", ["native", "cudaMallocAsync"])
def test_a_failed_capture_leaves_the_next_capture_memory_and_random_generator_as_they_were(allocator):
    """Three captures that fail (a host sync inside, 2 GiB allocated in their pool), in a fresh
    process under torch's native allocator (ComfyUI's --disable-cuda-malloc): a later capture records
    and replays, the failed pools' memory is given back, random numbers still come
    (training.graphed.undo_failed_capture). Under cudaMallocAsync (main.py's default on NVIDIA) a
    failed capture aborts the process, so capture_graph refuses before capturing."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"backend:{allocator}")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failed_capture_check.py")
    run_ = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    report = json.loads(run_.stdout.strip().splitlines()[-1])
    assert report["allocator"] == allocator
    if allocator == "cudaMallocAsync":  # refused before capturing: the failure would end the process
        assert report["refused"] and report["refused"].startswith("no CUDA graph: CUDA allocator cudaMallocAsync"), report
        return
    assert len(report["errors"]) == 3, report
    assert report["replayed"] == [7.0, 7.0], report
    assert report["reserved_growth"] < 2 ** 30, report  # not one failed pool (2 GiB) kept
    assert report["noise_finite"]


@pytest.mark.gpu
def test_under_cudamallocasync_cuda_graph_is_refused_naming_the_allocator_and_the_host_flag(tmp_path, graphs):
    if graphs:
        pytest.skip("this process runs torch's native allocator: cuda_graph works")
    with pytest.raises(ValueError, match=r"cuda_graph=True: CUDA allocator cudaMallocAsync.*--disable-cuda-malloc"):
        run(tmp_path, unet=tiny_unet().cuda(), cuda_graph=True, steps=2, precision="bf16", state_name=None)
    assert not (tmp_path / "state.train").exists()
