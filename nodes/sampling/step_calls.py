"""The model calls of a sampling step, behind one object: DomainGuider.predict_noise asks StepCalls
for the step's predictions and combines them (guider.py); how each is made is decided here.

- The base's rows [c, n | None, u?, weight-hook LoRA rows...] in one batched call, as the host
  batches KSampler's (u shares n's row when the negative is the empty prompt): through a
  RecordedCall (fastpath.py) where the base rows are recorded, else the host's calc_cond_batch. A
  model patch that replaces the host's row batching (sampler_calc_cond_batch_function, e.g.
  SkipLayerGuidance) gets the text rows exactly as the host's sampling_function gives them; u and
  the weight-hook rows are then a plain call of their own.
- Each domain row d_k: a full-copy or plain-LoRA domain through its DomainForward, launched before
  the base rows (the GPU computes it while the CPU launches them); a plain-LoRA domain's rows in the
  base's own call where both records allow it (lora_rows_in_base_call.py); a weight-hook LoRA domain in the
  base's batch; with the fast path off, a full-copy domain through the host's calc_cond_batch.

Made for one sampling run (DomainGuider.inner_sample, once the domain models are prepared) and
dropped after it, with the records it holds.
"""
from __future__ import annotations

import comfy.model_patcher
import comfy.samplers

from . import fastpath
from .domains import DomainKind, DomainState
from .lora_rows_in_base_call import LoraRowsInBaseCall

# A model patch that replaces the host's batching of the text rows (the host's sampling_function honours it).
CUSTOM_ROWS = "sampler_calc_cond_batch_function"


class StepCalls:
    """The model calls of one run's steps (see module docstring)."""

    def __init__(self, model, model_options: dict, conds, domains: list[DomainState], sigmas, fast_mode: str,
                 negative_is_null: bool):
        """model: the base's BaseModel (the guider's inner_model); model_options: the guider's;
        conds: () -> the guider's conditioning as the host processed it for the run; domains: the
        run's domain states, their models prepared; fast_mode: fastpath.mode()."""
        self.model = model
        self.conds = conds
        self.fast_mode = fast_mode
        self.negative_is_null = negative_is_null
        self.base_fast: fastpath.RecordedCall | None = None
        # The base rows recorded too, where some term can be on (with none, every step is the host's own
        # sampling_function), unless a LoRA domain rides in the base's call as a weight hook (the host
        # swaps the base's weights around that row) or a model patch replaces the host's row batching.
        if (fast_mode in ("graph", "eager", "separate") and any(d.kind.evaluated for d in domains)
                and not any(d.kind is DomainKind.HOOK for d in domains)
                and CUSTOM_ROWS not in model_options):
            self.base_fast = fastpath.RecordedCall("base model", model, use_graph=fast_mode == "graph")
        self.forwards: dict[int, fastpath.DomainForward] = {  # domain index -> its fast path
            d.index: self._domain_forward(d, model_options, sigmas) for d in domains
            if d.kind in (DomainKind.MODEL, DomainKind.ADAPTER) and fast_mode != "off"}
        self.lora_calls: dict[tuple, LoraRowsInBaseCall] = {}  # LoRA domains riding in the base's call, per set

    def _domain_forward(self, d: DomainState, model_options: dict, sigmas) -> fastpath.DomainForward:
        """The fast path of a full-copy domain (its own model) or a LoRA domain (the base's model)."""
        if d.kind is DomainKind.MODEL:
            model, options = d.inner_model, d.model_options
        else:  # the base's options as CFGGuider.inner_sample hands them to predict_noise
            model = self.model
            options = comfy.model_patcher.create_model_options_clone(model_options)
            options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        return fastpath.DomainForward(d.term.name, model, lambda: self.conds()[d.key], options, d.branches,
                                      use_graph=self.fast_mode in ("graph", "domain"))

    def text_rows(self, text: list, x, timestep, model_options) -> list:
        """The base's predictions of the text rows [c, n | zeros] alone (no u row unless the negative is it)."""
        return self._base_rows(text, [], x, timestep, model_options, with_null=False)[0]

    def step(self, text: list, active: list[DomainState], x, timestep, model_options) -> StepRows:
        """The base's rows with u, and the rows of the `active` domains that come with them (see StepRows)."""
        hooked = [d for d in active if d.kind is DomainKind.HOOK]
        joined = self._lora_rows_in_base_call(text, active, hooked, x, timestep, model_options)
        riding = joined[2] if joined else {}  # LoRA domains whose rows were in the base's call
        # Fast domain rows first: the GPU computes them while the CPU launches the base rows.
        made = {d.index: self.forwards[d.index](x, timestep) for d in active if d.index in self.forwards and d.index not in riding}
        out, null_row = joined[:2] if joined else self._base_rows(text, hooked, x, timestep, model_options)
        made.update(riding)
        return StepRows(self, out, null_row, made, hooked, x, timestep)

    def host_row(self, d: DomainState, x, timestep):
        """A full-copy domain's row through the host's calc_cond_batch (the straightforward path)."""
        return comfy.samplers.calc_cond_batch(d.inner_model, [self.conds()[d.key]], x, timestep, d.model_options)[0]

    def _base_row_list(self, text: list, hooked: list, with_null: bool) -> tuple[list, int | None]:
        """The base's rows as _base_rows batches them (no model patch replacing the host's batching)
        and the index of u among them."""
        conds = self.conds()
        extra = [] if not with_null or (self.negative_is_null and text[1] is not None) else [conds.get("null")]
        return text + extra + [conds[d.key] for d in hooked], (2 if extra else 1 if with_null else None)

    def _lora_rows_in_base_call(self, text: list, active: list, hooked: list, x, timestep, model_options) -> tuple | None:
        """(base predictions, index of u, {domain index: prediction}) from one call of the base's rows
        and the active LoRA domains' rows (lora_rows_in_base_call.py), or None where that call is not made:
        base rows not recorded, a weight-hook domain, a patch replacing the host's batching, the
        records not direct calls yet (first step) or not joinable."""
        lora = [d for d in active if d.kind is DomainKind.ADAPTER and d.index in self.forwards
                and self.forwards[d.index].call.model is self.model]
        if not lora or hooked or self.base_fast is None or self.fast_mode == "separate" or CUSTOM_ROWS in model_options:
            return None
        key = tuple(d.index for d in lora)
        if key not in self.lora_calls:
            self.lora_calls[key] = LoraRowsInBaseCall(self.base_fast, [self.forwards[d.index] for d in lora])
        rows, null_row = self._base_row_list(text, [], with_null=True)
        joined = self.lora_calls[key](rows, x, timestep, model_options)
        return None if joined is None else (joined[0], null_row, {d.index: p for d, p in zip(lora, joined[1])})

    def _base_rows(self, text: list, hooked: list, x, timestep, model_options, with_null: bool = True) -> tuple[list, int | None]:
        """The base's predictions [positive, negative | zeros, null?, LoRA-domain rows...] and the index
        of the empty prompt's row u (with_null=False: no u row unless the negative is it; index None).

        One batched call of the base, as the host batches KSampler's rows (the negative row doubles as
        u when the negative is the empty prompt). A model patch that replaces the host's row batching
        (sampler_calc_cond_batch_function, e.g. SkipLayerGuidance) gets the text rows exactly as the
        host's sampling_function gives them; u and the LoRA-domain rows are then a plain call of their own."""
        custom = model_options.get(CUSTOM_ROWS)
        if custom is None:
            rows, null_row = self._base_row_list(text, hooked, with_null)
            if self.base_fast is not None:
                out = self.base_fast(rows, x, timestep, model_options)
            else:
                out = comfy.samplers.calc_cond_batch(self.model, rows, x, timestep, model_options)
            return out, null_row
        conds = self.conds()
        out = list(custom({"conds": text, "input": x, "sigma": timestep, "model": self.model,
                           "model_options": model_options}))
        rest = ([conds.get("null")] if with_null else []) + [conds[d.key] for d in hooked]
        if rest:
            out += comfy.samplers.calc_cond_batch(self.model, rest, x, timestep, model_options)
        return out, (2 if with_null else None)


class StepRows:
    """One step's predictions: the base's rows as the host returns them (`base`, the text rows first,
    which the guider's pre-CFG functions may replace), u among them (`null`), and the domain rows."""

    def __init__(self, calls: StepCalls, base: list, null_row: int, made: dict, hooked: list, x, timestep):
        self.calls, self.base, self.null_row = calls, base, null_row
        self.made = made  # domain index -> prediction, for the rows made with or before the base's
        self.hooked = hooked  # the weight-hook domains, whose rows end the base's batch
        self.x, self.timestep = x, timestep

    @property
    def null(self):
        """u: the base's prediction on the empty prompt."""
        return self.base[self.null_row]

    def domains(self, active: list[DomainState]) -> dict:
        """d_k of every active domain (domain index -> prediction): the rows made with the base's,
        then the host's own call for any other."""
        predictions = dict(self.made)
        n = len(self.base) - len(self.hooked)
        predictions.update({d.index: self.base[n + j] for j, d in enumerate(self.hooked)})
        for d in active:
            if d.index not in predictions:  # the straightforward path of a full-copy domain
                predictions[d.index] = self.calls.host_row(d, self.x, self.timestep)
        return predictions
