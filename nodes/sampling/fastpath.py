"""The fast path of a sampling step: the model calls of the domain rows and of the base rows.

Why: at Stable Diffusion sizes on a GPU, a UNet call is ~2000 kernel launches, and the host's
Python work launching them (plus its per-call bookkeeping: conds, areas, memory checks, hook
weight swaps) takes longer than the GPU's work at batch 1 (docs/BENCHMARKS.md, "Sampling").
The straightforward guider paid a whole extra call per step for each domain row.

What: a RecordedCall makes the host's own call for a list of rows once (comfy.samplers.
calc_cond_batch, the straightforward path) and records the single apply_model call inside it.
Every later step with the same rows:

- calls apply_model with the recorded conditioning directly: the same kernels on the same
  inputs, hence the same numbers, without the per-step bookkeeping;
- on CUDA, replays that call as a CUDA graph: one launch per step instead of thousands, so the
  step costs the GPU's time, not the CPU's. Not where ComfyUI was started with
  --disable-cuda-graphs. The graphs belong to cudagraph.OWNER, which gives a later run with the
  same model, weights, LoRA, conditioning and shapes the graph of an earlier one (no capture),
  keeps a bounded amount between runs, and lets go when the host needs the memory;
- for the domain rows (DomainForward), is launched before the base rows.

A LoRA domain runs on the base's own modules with its LoRA as adapters: forward hooks of
lora_hooks/ (lora_applied), its branches read from the host's patches by lora_adapters.py.

Whatever the recording cannot reproduce exactly falls back to the host's call every step, and no
CUDA graph is made where the call may act differently per step or the weights are not at fixed
addresses: the rules are fastpath_rules.py. Under the host's dynamic VRAM the weights have fixed
slots that a later allocation may evict: a graph replays only while they hold the pages it read
(dynamic_vram.py). Weights that move, or are replaced, between steps are
re-recorded; a capture that fails leaves the direct call, a Cancel during it stops the run. A
record serves only the very options and rows objects it was made for.
Without graphs a LoRA domain's rows ride in the base's call (lora_rows_in_base_call.py).
INDOMAIN_FAST_DOMAIN=0 turns the fast path off, =eager keeps it without CUDA graphs, =separate
also without the LoRA rows in the base's call, =domain records only the domain rows.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref

import torch

import comfy.samplers

from ...cudagraph import OWNER, Graph, capture_stream, is_interrupt, peak_memory, weight_addresses
from ...lora_hooks import LoraBranch, lora_applied
from .. import dynamic_vram
from .fastpath_rules import graph_reason, host_state_reason, plain_cond

log = logging.getLogger(__name__)

ENV = "INDOMAIN_FAST_DOMAIN"

# Models whose forward copies from pageable CPU memory on every call (Wan's timestep embedding), which no
# capture can take: each failed capture keeps its call's tensors (cudagraph/), so such a loaded model is
# tried once and its later runs call it directly. (Other failures, e.g. a synchronizing op under a debug
# mode, may not repeat: those are tried again in the next run.)
_PAGEABLE_COPY = "Cannot copy between CPU and CUDA tensors during CUDA graph capture"
_CAPTURE_FAILED: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def mode() -> str:
    """'graph' (default), 'eager' (no CUDA graphs), 'separate' (eager, each LoRA domain in a call
    of its own instead of the base's: lora_rows_in_base_call.py), 'domain' (only the domain rows recorded, the
    base rows through the host's call every step) or 'off' (the straightforward guider)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return value if value in ("eager", "domain", "separate") else "graph"


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def apply_recorded(model, kwargs: dict, n: int, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """model.apply_model on n copies of x with recorded keyword arguments, the step's sigmas in their
    transformer_options (as the host's calc_cond_batch sets them each call)."""
    kwargs = {**kwargs, "transformer_options": {**kwargs["transformer_options"], "sigmas": timestep}}
    return model.apply_model(torch.cat([x] * n), torch.cat([timestep] * n), **kwargs)


def split_rows(rec: _Record, out: torch.Tensor, rows: list, x: torch.Tensor) -> list:
    """A record's batched output [n*B, ...] as the host returns it: one prediction per row, zeros
    for a None row (mask and strength are 1 for a plain row, so the host's weighted sum is the output)."""
    preds = [torch.zeros_like(x) for _ in rows]
    for chunk, index in zip(out.chunk(len(rec.order)), rec.order):
        preds[index] = chunk.to(x.dtype)
    return preds


class _Record:
    """The host's one apply_model call for a fixed list of rows, recorded."""

    def __init__(self, shape, options, rows, reason=None):
        # The objects the record is keyed by (their ids), held so that no other object takes an id over.
        self.options, self.rows = options, list(rows)
        self.shape = shape  # x's shape
        self.reason = reason  # why the host's call is made every step instead (None: recorded)
        self.kwargs = None  # apply_model keyword arguments (conditioning on the device)
        self.order: list[int] = []  # row index of each batch chunk of the call
        self.graph: Graph | None = None
        self.path = "host"  # "host" | "direct" | "graph"

    def holds(self, options, rows) -> bool:
        """True if the record was made for these very objects."""
        return self.options is options and len(rows) == len(self.rows) and all(a is b for a, b in zip(rows, self.rows))


class RecordedCall:
    """Rows of one model, rows -> [prediction per row] as comfy.samplers.calc_cond_batch gives them:
    the host's call first, then its recorded model call (see module doc)."""

    MAX_RECORDS = 8  # row lists per run (a partial interval gives two); more means they change per step

    def __init__(self, name: str, model, model_options: dict | None = None, branches: list[LoraBranch] | None = None,
                 use_graph: bool = True):
        self.name = name
        self.model = model  # the host's BaseModel (the base's own for a LoRA domain)
        self.model_options = model_options
        self.branches = branches
        self.use_graph = use_graph
        self.cache: dict = {}
        self.records: dict[tuple, _Record] = {}
        self.params = None  # the parameters' addresses at capture time
        self.slots: dynamic_vram.Slots | None = None  # dynamic VRAM: the weight slots the graphs read
        self.reported: set = set()

    def __call__(self, rows: list, x: torch.Tensor, timestep: torch.Tensor, model_options: dict | None = None) -> list:
        options, key, rec = self._lookup(rows, x, model_options)
        if rec is not None:
            if rec.reason is not None:
                return self._host_call(rows, x, timestep, options)
            if rec.graph is not None and not rec.graph.alive:  # the host took its memory back
                rec.graph, rec.path = None, "direct"
            if rec.graph is not None:
                if self._weights_moved():
                    self.records.clear()
                    self.slots = None
                    return self._record(key, rows, x, timestep, options)
                return split_rows(rec, self._replay(rec, x, timestep), rows, x)
            return split_rows(rec, self._direct(rec, x, timestep), rows, x)
        return self._record(key, rows, x, timestep, options)

    def _lookup(self, rows: list, x: torch.Tensor, model_options: dict | None) -> tuple[dict, tuple, _Record | None]:
        """(the options, the record key, the record made for these objects and x's shape, or None)."""
        options = self.model_options if model_options is None else model_options
        key = (id(options),) + tuple(None if r is None else id(r) for r in rows)
        rec = self.records.get(key)
        return options, key, rec if rec is not None and rec.shape == x.shape and rec.holds(options, rows) else None

    def direct_record(self, rows: list, x: torch.Tensor, model_options: dict | None = None) -> _Record | None:
        """The record of these rows if later steps call it directly (not as a graph, not the host's call)."""
        rec = self._lookup(rows, x, model_options)[2]
        return rec if rec is not None and rec.path == "direct" else None

    def _host_call(self, rows, x, timestep, options):
        with lora_applied(self.branches, self.cache):
            return comfy.samplers.calc_cond_batch(self.model, rows, x, timestep, options)

    def _direct(self, rec: _Record, x, timestep):
        """The recorded call made directly: the same kernels on the same inputs as the host's."""
        with lora_applied(self.branches, self.cache):
            return apply_recorded(self.model, rec.kwargs, len(rec.order), x, timestep)

    def _replay(self, rec: _Record, x, timestep):
        """The graph, or under dynamic VRAM, the graph if every weight slot still holds the pages it
        read; else the layers' own call, which pages the weights in again (dynamic_vram.py)."""
        if self.slots is None:
            return rec.graph(x, timestep)
        with self.slots.guard() as resident:
            if resident:
                return rec.graph(x, timestep)
        out = self._direct(rec, x, timestep)
        back = self.slots.refresh()
        if ("evicted", back) not in self.reported:
            self.reported.add(("evicted", back))
            log.info("%s: weights evicted from VRAM during the run; called directly%s", self.name,
                     ", then the CUDA graph again (weights back in their slots)" if back else
                     " until they are back in their slots")
        return out

    def _record(self, key, rows, x, timestep, options):
        if len(self.records) >= self.MAX_RECORDS:
            rec = _Record(x.shape, options, rows, f"more than {self.MAX_RECORDS} different calls in one run")
        else:
            rec = _Record(x.shape, options, rows, host_state_reason(self.model, options)
                          or next((r for r in (plain_cond(c) for c in rows if c is not None) if r), None))
        self.records[key] = rec
        if rec.reason is not None:
            self._report(rec, len(rows))
            return self._host_call(rows, x, timestep, options)
        calls = []
        real = self.model.apply_model

        def recorder(input_x, t, **kwargs):
            # transformer_options as the host passed it: the UNet adds its own keys to the dict during
            # the call (block, original_shape, ...), which a later call must not start with (a compiled
            # UNet's guards would see a different dict and recompile, inside a CUDA graph capture)
            calls.append((input_x, t, {**kwargs, "transformer_options": dict(kwargs.get("transformer_options", {}))}))
            return real(input_x, t, **kwargs)

        graph = self.use_graph and x.device.type == "cuda"
        stream = capture_stream(x.device) if graph else None  # (the capture's own: cuBLAS's workspace made here)
        peak: list[int] = []
        own = self.model.__dict__.get("apply_model")  # another pack may have set one on the instance
        self.model.apply_model = recorder
        streaming = dynamic_vram.streaming_mark()
        try:
            if stream is not None:  # the host's call doubles as the warm-up a CUDA graph capture needs
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream), peak_memory(x.device) as peak:
                    preds = self._host_call(rows, x, timestep, options)
                torch.cuda.current_stream(x.device).wait_stream(stream)
            else:
                preds = self._host_call(rows, x, timestep, options)
        finally:
            if own is None:
                del self.model.apply_model
            else:
                self.model.apply_model = own
        wanted = sorted(i for i, c in enumerate(rows) if c is not None)
        order = list(calls[0][2].get("transformer_options", {}).get("cond_or_uncond", [])) if len(calls) == 1 else []
        if (len(calls) != 1 or sorted(order) != wanted or calls[0][0].shape != (len(order) * x.shape[0], *x.shape[1:])
                or calls[0][2].get("control") is not None):
            rec.reason = f"the host's call was not one model call on all rows ({len(calls)} calls)"
            self._report(rec, len(rows))
            return preds
        # The conditioning tensors on the model's device once (the host copies them there on every call;
        # a CUDA graph cannot capture a copy from pageable CPU memory): the same values either way.
        rec.kwargs = {k: v if k == "transformer_options" else _to_device(v, x.device) for k, v in calls[0][2].items()}
        rec.order, rec.path = order, "direct"
        why_not = graph_reason(self.model, rec.kwargs, dynamic_vram.streamed_since(streaming)) if self.use_graph else "off"
        if why_not is None and self.model in _CAPTURE_FAILED:
            why_not = f"its capture failed in an earlier run ({_CAPTURE_FAILED[self.model]})"
        slots = None
        if graph and why_not is None and dynamic_vram.is_dynamic(self.model):
            slots = self.slots or dynamic_vram.Slots(self.model)
            if not slots.refresh():
                why_not = "weights not all resident in VRAM (dynamic VRAM)"
        if graph and why_not is None:
            try:
                rec.graph = self._graph(rec, x, timestep, slots, peak[0] if peak else None)
                self.slots = slots
                self.params = self._addresses()
                rec.path = "graph"
            except Exception as e:  # an op the capture cannot take: keep the direct call
                if is_interrupt(e):  # the host's Cancel, raised by a layer inside the capture
                    raise
                log.warning("%s: CUDA graph capture failed (%s: %s); calling the model directly",
                            self.name, type(e).__name__, e)
                if _PAGEABLE_COPY in str(e):  # what the forward's code does every call, not this run's state
                    _CAPTURE_FAILED[self.model] = f"{type(e).__name__}: {str(e)[:160]}"
                rec.graph = None
        elif graph:
            log.info("%s: no CUDA graph (%s)", self.name, why_not)
        self._report(rec, len(rows))
        return preds

    def _graph(self, rec: _Record, x, timestep, slots, peak: int | None) -> Graph:
        """The record's CUDA graph: an earlier run's, if it reads the same weights, LoRA and
        conditioning (cudagraph.OWNER), else captured now."""
        key = ("sampling", id(self.model), tuple(x.shape), x.dtype, tuple(timestep.shape), timestep.dtype,
               tuple(rec.order), tuple((id(b.module), id(b.down), id(b.up), b.scale) for b in self.branches or ()))
        weights = self._addresses(slots)

        def reusable(g: Graph) -> bool:
            why = ("the weights moved or were patched" if g.holds["weights"] != weights else
                   difference(g.holds["kwargs"], rec.kwargs))
            if why is not None:
                log.info("%s: the CUDA graph of an earlier run does not serve this one (%s differs)", self.name, why)
            return why is None

        found = OWNER.find(key, reusable)
        with contextlib.ExitStack() as pinned:
            if slots is not None and not pinned.enter_context(slots.guard()):
                raise RuntimeError("weights evicted from VRAM before the capture")
            if found is not None:
                rec.kwargs = found.holds["kwargs"]  # the tensors the graph reads (equal to this run's)
                log.debug("%s: CUDA graph of %d rows from an earlier run", self.name, len(rec.order))
                return found
            holds = {"kwargs": rec.kwargs, "weights": weights, "casts": self.cache,
                     "lora": [(b.down, b.up) for b in self.branches or ()]}  # (so that the ids stay theirs)
            made = OWNER.capture(key, lambda gx, gt: self._direct(rec, gx, gt), [x, timestep], x.device, peak,
                                 holds=holds, model=self.model)
        log.debug("%s: CUDA graph of %d rows captured in %s ms", self.name, len(rec.order), made.capture_ms)
        return made

    def _addresses(self, slots: dynamic_vram.Slots | None = None) -> list:
        """Where the weights the graphs read are, and which patches the host applied to them."""
        slots = slots if slots is not None else self.slots
        return [getattr(self.model, "current_weight_patches_uuid", None)] + weight_addresses(self.model) + (
            slots.addresses() if slots is not None else [])

    def _weights_moved(self) -> bool:
        """True if the model's weights are not where the graphs read them: moved, or replaced by new
        Parameter objects (the model's parameters as they are now, not the objects captured)."""
        return self.params is not None and self._addresses() != self.params

    def _report(self, rec: _Record, n_rows: int):
        what = (n_rows, rec.path, rec.reason)
        if what in self.reported:
            return
        self.reported.add(what)
        rows = f" ({n_rows} rows)" if n_rows > 1 else ""
        if rec.reason is not None:
            log.info("%s%s: straightforward path (%s)", self.name, rows, rec.reason)
        else:
            log.info("%s%s: fast path (%s%s)", self.name, rows, rec.path, ", LoRA as adapters" if self.branches else "")


class DomainForward:
    """d(x, t) = one domain row's prediction through a RecordedCall."""

    def __init__(self, name: str, model, get_cond, model_options: dict, branches: list[LoraBranch] | None = None,
                 use_graph: bool = True):
        self.get_cond = get_cond  # the row's conditioning as the host has processed it for this run
        self.call = RecordedCall(f"domain '{name}'", model, model_options, branches, use_graph)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.call([self.get_cond()], x, timestep)[0]


# transformer_options entries the host sets anew for every run or call, which the forward does not
# read under the fast path's rules (no wrappers, patches or callbacks acting per step)
_PER_CALL = ("uuids", "sigmas", "sample_sigmas")


def difference(a, b, path: str = "kwargs") -> str | None:
    """Where two recorded values differ (None: they would make the same model call): tensors of
    equal shape, dtype, device and values; containers of such; other objects identical or equal.
    In transformer_options the per-call entries (_PER_CALL) are not compared."""
    if a is b:
        return None
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
        return None if same else path
    if isinstance(a, dict) and isinstance(b, dict):
        if path.endswith("transformer_options"):
            a, b = ({k: v for k, v in o.items() if k not in _PER_CALL} for o in (a, b))
        if a.keys() != b.keys():
            return f"{path} keys {sorted(map(str, a.keys() ^ b.keys()))}"
        return next((d for k in a if (d := difference(a[k], b[k], f"{path}.{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return path
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := difference(x, y, f"{path}[{i}]")) is not None), None)
    try:
        return None if bool(a == b) else f"{path} ({type(a).__name__})"
    except Exception:  # objects whose == is not a truth value
        return f"{path} ({type(a).__name__})"
