"""cudagraph/: the rules every CUDA graph of the pack lives by, as far as they hold without a GPU.

A capture refuses waits before CUDA sees them, wants memory it can get, lets a Cancel through and,
when CUDA invalidated it, keeps only the tensors that cannot be freed. The owner reuses a graph
only for what it was made for, keeps a bounded number of bytes between runs and lets go of
everything when asked. The GPU halves: tests/failed_capture_check.py, tests/test_gpu_safe_running.py.
"""
import gc
import logging
import weakref

import pytest
import torch

import cudagraph
from cudagraph import capture, owner as owner_module


def test_inside_a_capture_waits_for_the_gpu_raise_before_cuda_sees_them_and_are_restored_after(monkeypatch):
    """waits_refused: while the calling thread's stream is capturing, torch.cuda.synchronize and
    the Stream and Event waits (which torch's sync debug mode does not see) raise a RuntimeError
    naming the call, instead of reaching CUDA, which would invalidate the capture (under
    cudaMallocAsync: an abort). Outside the block the originals are back."""
    originals = (torch.cuda.synchronize, torch.cuda.Stream.synchronize, torch.cuda.Event.synchronize,
                 torch.cuda.Event.query)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with cudagraph.waits_refused():
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
    GiB, free, trimmed = 2 ** 30, [3 * 2 ** 30], []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: (trimmed.append(1), free.__setitem__(0, free[0] + GiB)))
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(capture, "cuda_malloc_async", lambda: False)
    assert capture.memory_reason(dev, 100 * GiB) is None and not trimmed
    monkeypatch.setattr(capture, "cuda_malloc_async", lambda: True)
    assert capture.memory_reason(dev, None) is None
    assert capture.memory_reason(dev, GiB) is None and not trimmed  # 3 GiB free, 2.5 wanted
    assert capture.memory_reason(dev, int(1.5 * GiB)) is None and trimmed == [1]  # 3.5 wanted: 4 after the trim
    reason = capture.memory_reason(dev, 4 * GiB)
    assert reason == "5.00 GiB free on the GPU, 8.50 GiB wanted for the capture (twice the call's peak of 4.00 GiB, plus 0.5 GiB)"


class Cancelled(Exception):
    """Stands for the host's InterruptProcessingException (an Exception, not a BaseException)."""


def test_a_registered_cancel_and_ctrl_c_are_interrupts_a_failed_capture_is_not():
    assert cudagraph.is_interrupt(KeyboardInterrupt())
    assert not cudagraph.is_interrupt(Cancelled())
    cudagraph.register_interrupt(Cancelled)
    assert cudagraph.is_interrupt(Cancelled()) and not cudagraph.is_interrupt(RuntimeError("capture failed"))


def _failed_capture(tensor):
    """An error raised in a frame that holds `tensor` (as a capture's forward holds its activations)
    and a model (as the recorded call's frames hold the UNet and the conditioning), and a weak
    reference to that model."""
    model = torch.nn.Linear(4, 4)
    activations = [tensor, {"h": tensor + 1}]  # noqa: F841  (held by the frame, as a forward's are)
    try:
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    except RuntimeError as e:
        return e, weakref.ref(model)


def test_an_invalidated_capture_keeps_its_tensors_not_its_traceback_and_says_how_much(monkeypatch, caplog):
    """Under cudaMallocAsync the tensors of a capture CUDA invalidated cannot be freed: they are kept
    for the life of the process, counted in the log, and the error raised in its place carries no
    traceback into the failed call, so its model and conditioning are let go. Under the native
    allocator nothing is kept."""
    monkeypatch.setattr(capture, "_KEPT", [])
    monkeypatch.setattr(capture, "_KEPT_BYTES", [0])
    monkeypatch.setattr(capture, "cuda_malloc_async", lambda: False)
    error, _ = _failed_capture(torch.zeros(256))
    replaced = capture._invalidated(error, [torch.zeros(256)])
    assert capture._KEPT == [] and "invalidated by CUDA" in str(replaced)

    monkeypatch.setattr(capture, "cuda_malloc_async", lambda: True)
    activation = torch.zeros(1024)  # 4 KiB
    error, model = _failed_capture(activation)
    with caplog.at_level(logging.ERROR, logger="cudagraph.capture"):
        replaced = capture._invalidated(error, [activation, activation + 1])
    del error
    gc.collect()
    assert replaced.__traceback__ is None and replaced.__context__ is None
    assert model() is None, "the failed call's model is let go"
    assert capture.kept_bytes() == 8192 and any(t is activation for t in capture._KEPT[0])
    assert "2 tensors (0.0 MiB) kept" in caplog.text and "--disable-cuda-malloc" in caplog.text
    assert "invalidated CUDA graph capture (RuntimeError: operation not permitted when stream is capturing)" in caplog.text


def test_a_failed_captures_frames_give_their_tensors_not_the_models_parameters():
    """_frame_tensors: what the frames of a failed capture hold on the GPU, two levels into lists,
    tuples and dicts; parameters (the model's weights, freed with the model, never by the capture)
    are not among them."""
    class FakeCuda(torch.Tensor):
        is_cuda = True

    class CudaParameter(torch.nn.Parameter):
        is_cuda = True

    a, b = torch.zeros(2).as_subclass(FakeCuda), torch.ones(2).as_subclass(FakeCuda)
    weight = CudaParameter(torch.zeros(2))

    def frame():
        held = [a, {"x": b}, (weight,)]  # noqa: F841
        raise RuntimeError("invalidated")

    try:
        frame()
    except RuntimeError as e:
        found = capture._frame_tensors(e)
    assert [id(t) for t in found] == [id(a), id(b)]


class FakeGraph:
    """What release_graph lets go of: a graph whose reset is counted."""

    def __init__(self):
        self.resets = 0

    def reset(self):
        self.resets += 1


def fake(owner, key, nbytes, device="cuda:0", model=None, keep=True, holds=()):
    """A Graph as the owner holds one, without a capture (no GPU here)."""
    g = owner_module.Graph.__new__(owner_module.Graph)
    g.graph, g.out, g.inputs, g.holds = FakeGraph(), torch.zeros(1), [], holds
    g.device, g.nbytes, g.pool = torch.device(device), nbytes, None
    g.model = weakref.ref(model) if model is not None else None
    owner.graphs[key] = (g, keep)
    return g


class Model(torch.nn.Module):
    pass


def test_the_owner_gives_a_graph_only_to_what_it_was_made_for_and_counts_the_reuses():
    owner, model = cudagraph.GraphOwner(), Model()
    g = fake(owner, "a", 100, model=model, holds={"weights": [1, 2]})
    assert owner.find("b") is None
    assert owner.find("a", lambda x: x.holds["weights"] == [1, 2]) is g and owner.reuses == 1
    assert owner.find("a", lambda x: x.holds["weights"] == [1, 3]) is None  # other weights: released
    assert not g.alive and g.holds == () and "a" not in owner.graphs
    h = fake(owner, "c", 100, model=Model())  # its model is gone (garbage-collected)
    gc.collect()
    assert owner.find("c") is None and not h.alive


def test_after_a_run_the_owner_keeps_the_most_recent_graphs_within_its_bound(monkeypatch):
    """settle: the run's own graphs (keep=False) go; then the least recently used until the rest
    fit INDOMAIN_GRAPH_CACHE_GIB; 0 keeps none."""
    owner, model = cudagraph.GraphOwner(), Model()
    monkeypatch.setenv(cudagraph.ENV, str(250 / 2**30))  # 250 bytes
    old, mid, new = (fake(owner, ("sampling", k), 100, model=model) for k in ("old", "mid", "new"))
    run_only = fake(owner, ("sampling", "run"), 100, model=model, keep=False)
    owner.find(("sampling", "old"))  # used again: now the most recent
    assert owner.settle(torch.device("cuda", 0)) == 200
    assert [k[1] for k in owner.graphs] == ["new", "old"] and not mid.alive and not run_only.alive
    monkeypatch.setenv(cudagraph.ENV, "0")
    owner.settle(torch.device("cuda", 0))
    assert not owner.graphs and not old.alive and not new.alive and owner.held() == 0


def test_a_sampling_run_inside_a_training_run_settles_its_own_graphs_not_the_trainings(monkeypatch):
    """Train Domain UNet's validation samples run the sampling guider, which settles when it ends: the
    training run's step graphs (run-only, still replayed after the samples) stay, outside the bound."""
    owner, model = cudagraph.GraphOwner(), Model()
    monkeypatch.setenv(cudagraph.ENV, str(100 / 2**30))  # 100 bytes
    step = fake(owner, ("training", 1, (8, 4, 32, 32)), 500, model=model, keep=False)
    kept = fake(owner, ("sampling", "a"), 100, model=model)
    sampling_only = fake(owner, ("sampling", "b"), 100, model=model, keep=False)
    assert owner.settle(torch.device("cuda", 0)) == 100
    assert step.alive and kept.alive and not sampling_only.alive
    assert owner.settle(torch.device("cuda", 0), kind="training") == 500 and not step.alive and kept.alive


def test_the_owner_lets_go_of_a_device_and_of_unloaded_models_when_asked():
    owner, loaded, unloaded = cudagraph.GraphOwner(), Model(), Model()
    a = fake(owner, "a", 100, model=loaded)
    b = fake(owner, "b", 100, model=unloaded)
    c = fake(owner, "c", 100, device="cuda:1", model=loaded)
    run = fake(owner, "run", 100, model=Model(), keep=False)  # a training run's: its model is no host model
    assert owner.held(torch.device("cuda", 0)) == 300 and owner.held(torch.device("cuda", 1)) == 100
    assert owner.sweep(lambda m: m is loaded) == 100 and not b.alive and a.alive and run.alive
    assert owner.release(torch.device("cuda", 0), "test") == 200 and not a.alive and not run.alive and c.alive
    assert owner.release() == 100 and owner.held() == 0


def test_graphed_training_steps_let_a_cancel_through_and_fall_back_on_a_failed_capture(monkeypatch):
    """GraphedSteps: a capture that fails leaves the shape eager; a Cancel raised inside the
    capture (by the host's layers) stops the run instead. The owner is stood in for (no GPU)."""
    from training.graphed import GraphedSteps
    cudagraph.register_interrupt(Cancelled)

    class Owner(cudagraph.GraphOwner):
        def capture(self, *args, **kwargs):
            raise self.error

    model = torch.nn.Linear(4, 4)
    model.forward = lambda x, t: torch.nn.functional.linear(x, model.weight, model.bias)
    owner = Owner()
    steps = GraphedSteps(model, list(model.parameters()), None, warmup=1, owner=owner)
    x, t, y = torch.randn(2, 4), torch.ones(2), torch.zeros(2, 4)
    steps(x, t, y, {})  # the warm-up step
    owner.error = RuntimeError("an op the capture cannot take")
    eager = steps(x, t, y, {})
    assert (2, 4) in steps.failed and torch.isfinite(eager)
    steps = GraphedSteps(model, list(model.parameters()), None, warmup=1, owner=owner)
    steps(x, t, y, {})
    owner.error = Cancelled("Processing interrupted")
    with pytest.raises(Cancelled):
        steps(x, t, y, {})
    assert not steps.failed
