"""When the base and a full-copy domain do not fit on the device: the host's low-VRAM loading,
emulated on the CPU, and the weight copies each sampling step makes (issue 37, item 3).

The cap: the host's model management sees a device of `cap` bytes (its free-memory query answers
the cap less what the diffusion models hold: on the CPU
the host does not unload the text encoder before sampling as it does from a GPU), is in its low-VRAM state with NVIDIA's weight ratio (no weights
loaded into the room kept for inference) and, inside load_models_gpu only, takes the CPU for a
device it may load partially. The host then loads each model as on a small GPU: some layers
resident, the others marked to be copied to the device in every forward (comfy_cast_weights),
through comfy.ops.cast_bias_weight, which the test counts per model and per call.
"""
import logging
import sys
from collections import Counter

import pytest

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image
from tests.test_host_fastpath import files  # noqa: F401  (the tiny domain files)

STEPS = 3
pytestmark = pytest.mark.cpu_tier  # the emulation takes the CPU for the device; on a GPU the host's own low VRAM is real


@pytest.fixture
def capped(comfy, monkeypatch):
    """cap(factor, inference): the device holds factor times the tiny base's weights; inference:
    the room the host keeps for a call (minimum_inference_memory). Returns the Copies counter."""
    import comfy.model_management as mm
    import comfy.ops as ops
    from comfy import model_base

    copies = Copies(tiny.tiny_model().model)

    def cap(factor: float, inference: int = 1 << 20) -> Copies:
        total = int(tiny.tiny_model().model_size() * factor)

        def free(dev=None, torch_free_too=False):
            left = total - sum(m.model_loaded_memory() for m in mm.current_loaded_models
                               if isinstance(m.model.model, model_base.BaseModel))
            return (left, left) if torch_free_too else left

        on_cpu = mm.is_device_cpu
        monkeypatch.setattr(mm, "get_free_memory", free)
        monkeypatch.setattr(mm, "vram_state", mm.VRAMState.LOW_VRAM)
        monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)
        monkeypatch.setattr(mm, "minimum_inference_memory", lambda: inference)
        monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 0)
        monkeypatch.setattr(mm, "is_device_cpu",
                            lambda d: False if sys._getframe(1).f_code.co_name == "load_models_gpu" else on_cpu(d))
        monkeypatch.setattr(model_base.BaseModel, "apply_model", copies.wrap_apply(model_base.BaseModel.apply_model))
        monkeypatch.setattr(ops, "cast_bias_weight", copies.wrap_cast(ops.cast_bias_weight))
        mm.unload_all_models()
        return copies

    yield cap
    monkeypatch.undo()
    mm.unload_all_models()  # (the next test loads the tiny base afresh, whole)


class Copies:
    """Model calls and streamed-weight copies, per model ("base" or "domain")."""

    def __init__(self, base_model):
        self.base_model = base_model
        self.calls: list[tuple[str, int]] = []  # (model, rows) in call order
        self.copies: Counter = Counter()  # model -> layers copied to the device in its forwards
        self.streamed: dict[str, set] = {}  # model -> layers the host left off the device (per call)
        self.current: list[str] = []

    def name(self, model) -> str:
        return "base" if model is self.base_model else "domain"

    def wrap_apply(self, real):
        def apply(model, x, *args, **kwargs):
            name = self.name(model)
            self.calls.append((name, x.shape[0]))
            self.streamed.setdefault(name, set()).add(
                sum(1 for m in model.modules() if hasattr(m, "prev_comfy_cast_weights")))
            self.current.append(name)
            try:
                return real(model, x, *args, **kwargs)
            finally:
                self.current.pop()
        return apply

    def wrap_cast(self, real):
        def cast(layer, *args, **kwargs):
            if self.current and hasattr(layer, "prev_comfy_cast_weights"):  # a low-VRAM layer of a sampling model
                self.copies[self.current[-1]] += 1
            return real(layer, *args, **kwargs)
        return cast

    def per_step(self, name: str) -> float:
        return self.copies[name] / STEPS

    def layers(self, name: str) -> int:
        """The model's streamed layers (the same at every call of the run)."""
        (n,) = self.streamed[name]
        return n


def domain_loaded_first(monkeypatch, copies: Copies):
    """The host loads the domain before the base. load_models_gpu loads the models it is given one
    after the other, each taking the room left, in the order of a Python set of them (either, from
    run to run): here the domains, then the base, each by a call of its own with the same
    arguments (a model given again is loaded afresh, so one call cannot be made before the other)."""
    import comfy.model_management as mm
    real = mm.load_models_gpu

    def load(models, *args, **kwargs):
        base = [m for m in models if getattr(m, "model", None) is copies.base_model]
        if not base or len(base) == len(models):
            return real(models, *args, **kwargs)
        real([m for m in models if m not in base], *args, **kwargs)
        return real(base, *args, **kwargs)

    monkeypatch.setattr(mm, "load_models_gpu", load)


def sample(comfy, monkeypatch, files, fast: str, **inputs):
    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", fast)
    p = text_to_image(steps=STEPS, domain=["dom", 0], domain_scale=1.5, extra={"dom": loader(files["domain"])})
    p["sample"]["inputs"].update(inputs)
    return comfy.run(p)["captured"]["out"]["samples"]


@pytest.mark.parametrize("fast", ["0", "1"])
def test_under_a_cap_each_model_is_called_once_per_step_and_copies_its_streamed_layers_once(
        comfy, files, monkeypatch, capped, fast):
    """The rows of one model in one call, each model once per step: every streamed layer copied
    once per step. The fast path launches the domain's call first, the straightforward guider the
    base's: either order copies the same."""
    three_rows = tiny.tiny_model().model.memory_required([3, 4, 8, 8])
    copies = capped(1.5, int(1.5 * three_rows) + (1 << 20))  # room kept for the base's three rows in one call
    domain_loaded_first(monkeypatch, copies)
    sample(comfy, monkeypatch, files, fast)
    one_step = [("domain", 1), ("base", 3)] if fast == "1" else [("base", 3), ("domain", 1)]
    assert copies.calls == one_step * STEPS
    assert copies.layers("domain") > 0  # the cap holds: weights streamed
    for name in ("base", "domain"):
        assert copies.per_step(name) == copies.layers(name)  # once per call, one call per step
    # the base's weights kept on the device, the domain's streamed (residency.base_first)
    assert copies.layers("base") < copies.layers("domain")


@pytest.mark.parametrize("fast", ["0", "1"])
def test_the_base_stays_resident_where_the_host_splits_its_rows(comfy, files, monkeypatch, capped, fast, caplog):
    """With little room kept for a call the host runs the base's three rows in three calls (and the
    fast path keeps the host's call): each call copies the base's streamed layers again. The host
    loading the domain first left the whole base streamed; the guider moves the room to the base."""
    import comfy.model_management as mm
    guider = tiny_guider_module()
    caplog.set_level(logging.INFO)
    inference = int(tiny.tiny_model().model.memory_required([2, 4, 8, 8]))  # room for two rows: not 1.5 x three
    results = {}
    for moved in (False, True):
        copies = capped(1.5, inference)
        copies.calls.clear(), copies.copies.clear(), copies.streamed.clear()
        domain_loaded_first(monkeypatch, copies)
        if not moved:
            monkeypatch.setattr(guider, "base_first", lambda base, domains: 0)
        results[moved] = sample(comfy, monkeypatch, files, fast)
        base_calls = sum(1 for name, _ in copies.calls if name == "base") / STEPS
        assert base_calls >= 2 and sum(r for name, r in copies.calls if name == "base") == 3 * STEPS  # split
        assert copies.calls.count(("domain", 1)) == STEPS
        assert copies.per_step("base") == base_calls * copies.layers("base")  # again in every call
        assert copies.per_step("domain") == copies.layers("domain")
        results[moved, "copies"] = copies.per_step("base") + copies.per_step("domain")
        results[moved, "layers"] = (copies.layers("base"), copies.layers("domain"))
        mm.unload_all_models()
        monkeypatch.undo()
    logging.getLogger(__name__).warning("copies per step: host's order %s, base first %s; streamed layers %s -> %s",
                                        results[False, "copies"], results[True, "copies"], results[False, "layers"],
                                        results[True, "layers"])
    assert results[True, "layers"][0] < results[False, "layers"][0]
    assert results[True, "copies"] < results[False, "copies"]
    assert close(results[True], results[False], rel=1e-4)  # (the host may batch the rows otherwise: float order)


def tiny_guider_module():
    from tests.support.host import pack_module
    return pack_module("nodes.sampling.guider")


def test_no_cuda_graph_of_a_partially_loaded_model(comfy, capped):
    """A model the host loaded in part copies its streamed layers inside every forward: the fast
    path makes no CUDA graph of it (fastpath_rules.graph_reason), whatever else allows one."""
    import comfy.model_management as mm

    rules = comfy.pack("nodes.sampling.fastpath_rules")
    patcher = tiny.load_unet(tiny.unet_state_dict(0))  # a model of its own
    patcher.model.current_patcher = patcher
    capped(3.0)
    mm.load_models_gpu([patcher])  # fits: whole
    assert patcher.loaded_size() == patcher.model_size()
    assert not any(getattr(m, "comfy_cast_weights", False) for m in patcher.model.modules())
    assert rules.graph_reason(patcher.model, {}) == "weights not on the GPU"  # (the CPU; on a GPU: None)
    mm.unload_all_models()
    capped(0.5)
    mm.load_models_gpu([patcher])
    assert 0 < patcher.loaded_size() < patcher.model_size()
    assert rules.graph_reason(patcher.model, {}) == "weights cast or patched inside the forward"
