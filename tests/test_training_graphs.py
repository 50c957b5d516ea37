"""TrainConfig.cuda_graph (training/graphed.py): the steps' forward and backward replayed as CUDA
graphs train what the eager steps train, and the option refuses what it cannot do.

The GPU tests (marked gpu) train the stand-in UNet of tests/support/standins.py on the GPU
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

from tests.support.standins import run, tiny_unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
def test_graphed_steps_train_what_eager_steps_train(tmp_path, caplog, mode, ckpt):
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
def test_graphs_let_go_under_cudamallocasync_leave_the_console_quiet():
    """ComfyUI's default allocator warns "Attempting uncaptured free of a captured allocation" on
    stderr each time a captured tensor is freed outside its graph: a plain `del` of a graph and its
    output does (the control). Freed through release_graph, as a sampling run's Graph and
    training's GraphedSteps are when they go, it does not."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    run_ = subprocess.run([sys.executable, "-m", "tests.graph_release_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    report = json.loads(run_.stdout.strip().splitlines()[-1])
    assert report["allocator"] == "cudaMallocAsync" and report["captured"] == 1, report
    losses = report["losses"]  # two eager steps, the capture's, a replay: the same weights, the same loss
    assert report["sampled"] == [4.0, 4.0] and max(losses) - min(losses) <= 1e-6 * max(losses), report
    parts = {}
    for chunk in run_.stderr.split("=== ")[1:]:
        name, _, text = chunk.partition("\n")
        parts[name] = text
    assert list(parts) == ["plain del", "release_graph", "Graph", "GraphedSteps", "end"], run_.stderr[-3000:]
    assert "uncaptured free of a captured allocation" in parts["plain del"], run_.stderr[-3000:]
    for name in ("release_graph", "Graph", "GraphedSteps"):
        assert "uncaptured free" not in parts[name], (name, run_.stderr[-3000:])


@pytest.mark.gpu
@pytest.mark.parametrize("allocator", ["native", "cudaMallocAsync"])
def test_failed_captures_leave_the_next_capture_memory_and_random_generator_as_they_were(allocator):
    """Four captures that fail, in a fresh process under each allocator (cudaMallocAsync is
    ComfyUI's default on NVIDIA, native its --disable-cuda-malloc), each after allocating 2 GiB in
    the capture: .item(), torch.cuda.synchronize(), an Event's synchronize, a copy from pageable
    memory. Each raises (refused before CUDA sees it: cudagraph.waits_refused) and the process goes
    on, also past a graph dropped before its first replay: a later capture records and replays, the
    memory is given back, random numbers still come. Then a wait CUDA refuses itself (the capture
    invalidated: its 2 GiB kept, counted), a first replay short of memory, and a Cancel raised inside
    a capture (it comes out as itself): the process goes on and captures again. Graphs held by the
    owner give CUDA's graph memory back when released. Under cudaMallocAsync, where freeing an
    invalidated capture's tensors aborts, this is what keeps ComfyUI running."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"backend:{allocator}")
    run_ = subprocess.run([sys.executable, "-m", "tests.failed_capture_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    report = json.loads(run_.stdout.strip().splitlines()[-1])
    assert report["allocator"] == allocator
    assert [e.split(":")[0] for e in report["errors"]] == ["RuntimeError"] * 4, report
    assert "waits for the GPU" in report["errors"][1] and "waits for the GPU" in report["errors"][2], report
    assert report["replayed"] == [7.0, 7.0], report
    assert report["reserved_growth"] < 2 ** 30, report  # not one failed capture's 2 GiB kept
    assert report["noise_finite"]
    late = report["late"]
    assert late["cuda_refused"].startswith("RuntimeError: CUDA graph capture invalidated"), late
    assert late["cancel"] == "Cancel: Processing interrupted", late  # a Cancel inside a capture comes out as itself
    assert late["oom_first_replay"] != "no error" or allocator == "native", late
    if allocator == "cudaMallocAsync":  # what an invalidated capture allocated is kept, counted (2 GiB), never freed
        assert report["kept_bytes"] >= 2 ** 31, report
    assert report["after_late"] == [7.0, 7.0], report
    assert report["owner_replays"] == [1.0, 2.0, 3.0] and report["alive_after_release"] == [False] * 3, report
    used = report["graph_used"]
    if allocator == "cudaMallocAsync":  # the owner's graphs held CUDA graph memory, and gave it all back
        assert used[1] - used[0] >= 2 ** 28 and used[2] <= used[0] + 2 ** 20, used
