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


def test_inside_a_capture_waits_for_the_gpu_raise_before_cuda_sees_them_and_are_restored_after(monkeypatch):
    """waits_refused: while the calling thread's stream is capturing, torch.cuda.synchronize and
    the Stream and Event waits (which torch's sync debug mode does not see) raise a RuntimeError
    naming the call, instead of reaching CUDA, which would invalidate the capture (under
    cudaMallocAsync: an abort). Outside the block the originals are back."""
    from training.graphed import waits_refused
    originals = (torch.cuda.synchronize, torch.cuda.Stream.synchronize, torch.cuda.Event.synchronize,
                 torch.cuda.Event.query)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with waits_refused():
        with pytest.raises(RuntimeError, match=r"synchronize\(\) waits for the GPU: not possible inside a CUDA graph"):
            torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match=r"query\(\) waits"):
            torch.cuda.Event.query(object())
        with pytest.raises(RuntimeError, match=r"synchronize\(\) waits"):
            torch.cuda.Stream.synchronize(object())
    assert (torch.cuda.synchronize, torch.cuda.Stream.synchronize, torch.cuda.Event.synchronize,
            torch.cuda.Event.query) == originals


def test_under_cudamallocasync_a_capture_wants_twice_the_calls_peak_free_and_trims_torchs_pool_first(monkeypatch):
    """memory_reason: under cudaMallocAsync a capture is refused, naming the figures, unless twice
    the call's measured peak plus 0.5 GiB is free on the GPU; when short, torch's pool is trimmed
    (empty_cache) and free memory read again. Under the native allocator, or with no peak measured,
    nothing is refused."""
    from training import graphed
    GiB, free, trimmed = 2 ** 30, [3 * 2 ** 30], []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (trimmed.append(1), free.__setitem__(0, free[0] + GiB)))
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(graphed, "cuda_malloc_async", lambda: False)
    assert graphed.memory_reason(dev, 100 * GiB) is None and not trimmed
    monkeypatch.setattr(graphed, "cuda_malloc_async", lambda: True)
    assert graphed.memory_reason(dev, None) is None
    assert graphed.memory_reason(dev, GiB) is None and not trimmed  # 3 GiB free, 2.5 wanted
    assert graphed.memory_reason(dev, int(1.5 * GiB)) is None and trimmed == [1]  # 3.5 wanted: 4 after the trim
    reason = graphed.memory_reason(dev, 4 * GiB)
    assert reason == "5.00 GiB free on the GPU, 8.50 GiB wanted for the capture (twice the call's peak of 4.00 GiB, plus 0.5 GiB)"


def test_under_cudamallocasync_an_invalidated_captures_error_is_kept_for_good_and_the_log_says_what_to_do(monkeypatch, caplog):
    """_keep_if_async: a capture CUDA invalidated leaves tensors that cannot be freed under
    cudaMallocAsync, so its error (whose traceback holds them) is kept for the life of the
    process, and the log names the way out (--disable-cuda-malloc); under the native allocator
    nothing is kept."""
    from training import graphed
    monkeypatch.setattr(graphed, "_KEPT", [])
    error = RuntimeError("operation not permitted when stream is capturing\nmore")
    monkeypatch.setattr(graphed, "cuda_malloc_async", lambda: False)
    graphed._keep_if_async(error)
    assert graphed._KEPT == []
    monkeypatch.setattr(graphed, "cuda_malloc_async", lambda: True)
    with caplog.at_level(logging.ERROR, logger="training.graphed"):
        graphed._keep_if_async(error)
    assert graphed._KEPT == [error]
    assert "invalidated by CUDA (operation not permitted when stream is capturing)" in caplog.text
    assert "--disable-cuda-malloc" in caplog.text


@pytest.mark.gpu
def test_graphs_let_go_under_cudamallocasync_leave_the_console_quiet():
    """ComfyUI's default allocator warns "Attempting uncaptured free of a captured allocation" on
    stderr each time a captured tensor is freed outside its graph: a plain `del` of a graph and its
    output does (the control). Freed through release_graph, as a sampling run's CudaGraph and
    training's GraphedSteps are when they go, it does not."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "graph_release_check.py")
    run_ = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    report = json.loads(run_.stdout.strip().splitlines()[-1])
    assert report["allocator"] == "cudaMallocAsync" and report["captured"] == 1, report
    losses = report["losses"]  # two eager steps, the capture's, a replay: the same weights, the same loss
    assert report["sampled"] == [4.0, 4.0] and max(losses) - min(losses) <= 1e-6 * max(losses), report
    parts = {}
    for chunk in run_.stderr.split("=== ")[1:]:
        name, _, text = chunk.partition("\n")
        parts[name] = text
    assert list(parts) == ["plain del", "release_graph", "CudaGraph", "GraphedSteps", "end"], run_.stderr[-3000:]
    assert "uncaptured free of a captured allocation" in parts["plain del"], run_.stderr[-3000:]
    for name in ("release_graph", "CudaGraph", "GraphedSteps"):
        assert "uncaptured free" not in parts[name], (name, run_.stderr[-3000:])


@pytest.mark.gpu
@pytest.mark.parametrize("allocator", ["native", "cudaMallocAsync"])
def test_failed_captures_leave_the_next_capture_memory_and_random_generator_as_they_were(allocator):
    """Four captures that fail, in a fresh process under each allocator (cudaMallocAsync is
    ComfyUI's default on NVIDIA, native its --disable-cuda-malloc), each after allocating 2 GiB in
    the capture: .item(), torch.cuda.synchronize(), an Event's synchronize, a copy from pageable
    memory. Each raises (refused before CUDA sees it: training.graphed.waits_refused) and the
    process goes on, also past a graph dropped before its first replay: a later capture records and replays, the memory is given back, random numbers
    still come. Under cudaMallocAsync, where freeing an invalidated capture's tensors aborts, this
    is what keeps ComfyUI running."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"backend:{allocator}")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failed_capture_check.py")
    run_ = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    report = json.loads(run_.stdout.strip().splitlines()[-1])
    assert report["allocator"] == allocator
    assert [e.split(":")[0] for e in report["errors"]] == ["RuntimeError"] * 4, report
    assert "waits for the GPU" in report["errors"][1] and "waits for the GPU" in report["errors"][2], report
    assert report["replayed"] == [7.0, 7.0], report
    assert report["reserved_growth"] < 2 ** 30, report  # not one failed capture's 2 GiB kept
    assert report["noise_finite"]
