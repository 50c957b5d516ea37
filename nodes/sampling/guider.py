"""DomainGuider: the paper's decoupled multi-guidance as a ComfyUI guider.

Per step, with u = base(null), c = base(positive), n = base(negative), d_k = domain_k(null):

    denoised = cfg_function(c, n, cfg) + sum_k w_k * (d_k - u)

cfg_function is the host's own KSampler guidance (so model patches such as RescaleCFG keep
working); the domain sum is guidance.add_domain_terms. A step where no term is on (every w_k = 0,
or outside every term's interval) is the host's own sampling_function: KSampler exactly, under any
model patch. A patch that batches the text rows itself (sampler_calc_cond_batch_function) gets
exactly [c, n] as from the host; u and the LoRA-domain rows are then a call of their own.
Before the run the guider asks the host's model management for room for the rows its estimate
leaves out (u and the domain rows); where the base and a full-copy domain do not both fit, the base's
weights are the ones kept on the device (residency.py). domain_every = k > 1 (opt-in): the domain rows and u on every
k-th model evaluation only; in between, KSampler's two rows plus each term's last d_k - u
(guidance.add_domain_differences; a term that was off, or a new latent shape, computes afresh).

How each domain model is evaluated:
- weight 0: not at all (not even loaded), the term is zero;
- the same weights as the base (the base MODEL wired in twice): d_k = u, the term is zero;
- a clone of the base with extra weight patches (a LoRA domain): plain LoRA patches run as
  adapters on the base's own modules (the host's patches read in lora_adapters.py, added by
  lora_hooks/' forward hooks; no second model in memory);
  other patch types ride in the base's batched call as a weight hook, the host's per-row
  mechanism (conditioning.hook_group);
- a separate model (a full-copy domain UNet): it is loaded together with the base as an
  additional model of the conditioning, prepared like the base (pre_run, wrappers, hooks)
  and evaluated in its own call.

A guidance-distilled model (Flux.1 dev) reads its guidance value from each row's conditioning: u and
every d_k take the positive's (conditioning.with_prompt_guidance), so the domain term is measured at
c's guidance, whatever the empty prompt carries; n keeps the negative's own, as in KSampler.

The step's model calls are made by one object per run, StepCalls (step_calls.py); predict_noise
combines what it gives. The fast path (fastpath.py): each domain row and the base's batched rows
go through the host's calc_cond_batch on the first step; its one model call is recorded and, every
later step, made directly (a CUDA graph on CUDA, kept for later identical runs by cudagraph.OWNER
within its bound), the domain rows launched before the base rows. Whatever the recording cannot
reproduce (ControlNet, hooks, areas, masks, wrappers...) keeps the host's call.
INDOMAIN_FAST_DOMAIN=0 gives the straightforward path: every row through the host's
calc_cond_batch each step (the reference the fast path is tested against); =domain records the
domain rows only; =eager records without CUDA graphs.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers

from . import fastpath
from ...cudagraph import OWNER
from ..domain_files import DomainModelError
from ..dynamic_vram import cannot_copy, settle_lazy_dtypes
from .conditioning import (check_text_width, hook_group, patch_difference, positive_control, same_conditioning,
                           with_prompt_guidance, with_values)
from .domains import DomainKind, DomainState, DomainTerm, check_domain_model, kind_of
from .lora_adapters import compiled_reason, lora_branches
from .residency import base_first
from .step_calls import StepCalls
from ...guidance import (GuidanceTerm, TermInterval, add_domain_differences, add_domain_terms, check_domain_every,
                        covers_whole_run, is_active, recompute_domain)

log = logging.getLogger(__name__)


class DomainGuider(comfy.samplers.CFGGuider):
    """CFGGuider of the base MODEL plus text-free domain terms (see module docstring)."""

    def __init__(self, model_patcher, terms: list[DomainTerm] = (), control_in_domain: bool = False,
                 domain_every: int = 1):
        super().__init__(model_patcher)
        self.terms = list(terms)
        self.control_in_domain = control_in_domain
        self.domain_every = check_domain_every(int(domain_every))  # 1: exact; k: domain rows every k-th evaluation
        self.evaluation = 0  # model evaluations so far in this run
        self.differences: dict[int, torch.Tensor] = {}  # domain index -> d - u at its last computation
        self.negative_is_null = False
        self.domains: list[DomainState] = []
        self.fast_mode = fastpath.mode()
        self.read_sigma = True
        self.calls: StepCalls | None = None  # the model calls of the run's steps (inside a run only)

    def set_conds(self, positive, negative, null):
        """positive/negative as for KSampler; null: the base's empty-prompt conditioning."""
        for input_name, conditioning in (("positive", positive), ("negative", negative), ("null_conditioning", null)):
            check_text_width(self.model_patcher, conditioning, input_name)
        if any(term.weight != 0.0 for term in self.terms):  # (no domain row: the empty prompt is not used)
            null = with_prompt_guidance(null, positive)  # u and d at c's guidance (Flux.1 dev)
        self.negative_is_null = same_conditioning(negative, null)
        conds = {"positive": positive, "negative": negative, "null": null}
        self.domains = []
        control = positive_control(positive) if self.control_in_domain else None
        self.fast_mode = fastpath.mode()
        for i, term in enumerate(self.terms):
            kind = DomainKind.OFF if term.weight == 0.0 else kind_of(self.model_patcher, term.model)  # weight 0: not even loaded
            domain = DomainState(i, term, kind)
            self.domains.append(domain)
            if kind.evaluated:
                conds[domain.key] = with_values(null, self._domain_row_values(domain, control))
        self.inner_set_conds(conds)

    def _domain_row_values(self, domain: DomainState, control) -> dict:
        """What a domain's row sets on the empty prompt's conditioning. A LoRA of the base becomes an
        ADAPTER here where the fast path can run its patches as adapters, else stays a weight HOOK."""
        term = domain.term
        values = {"prompt_type": "negative"}
        if domain.kind is DomainKind.HOOK:
            extra = patch_difference(self.model_patcher, term.model)
            if self.fast_mode != "off" and control is None:
                compiled = compiled_reason(self.model_patcher, term.model)
                if compiled:
                    log.info("domain %r: LoRA kept as a weight hook (%s)", term.name, compiled)
                else:
                    domain.branches = lora_branches(self.model_patcher.model, extra)
                    if domain.branches is not None:
                        domain.kind, domain.patches = DomainKind.ADAPTER, extra
        if domain.kind is DomainKind.HOOK:
            self._check_hook_allowed(term.name)
            values["hooks"] = hook_group(extra)
        elif domain.kind is DomainKind.MODEL:
            check_domain_model(self.model_patcher, term)
            # Loaded with the base for the whole run, as the host loads models carried by conditioning.
            # (Never a LoRA clone: loading it would patch the weights it shares with the base.)
            values["additional_models"] = [term.model]
        if control is not None:
            values["control"] = control
        return values

    def inner_set_conds(self, conds):
        dynamic = self.model_patcher
        super().inner_set_conds(conds)  # under dynamic VRAM, conds with hooks: the host's non-dynamic delegate
        if self.model_patcher is not dynamic:
            settle_lazy_dtypes(self.model_patcher.model)
            for d in self.domains:  # the LoRA adapters on the modules of the model that runs
                if d.kind is DomainKind.ADAPTER:
                    d.branches = lora_branches(self.model_patcher.model, d.patches)

    def _check_hook_allowed(self, name: str) -> None:
        """Under dynamic VRAM the host runs a weight hook on a non-dynamic copy of the base, which
        it can make only of a MODEL from its own loaders (comfy ModelPatcher.cached_patcher_init)."""
        if cannot_copy(self.model_patcher):
            raise DomainModelError(
                f"domain {name!r} is a LoRA of the base that runs as a weight hook here (not a plain LoRA, a "
                "compiled model, ControlNet in the domain row, or INDOMAIN_FAST_DOMAIN=0); under ComfyUI's "
                "dynamic VRAM the host runs weight hooks on a copy of the base that it loads again from its "
                "file, and this base MODEL came from a node that gives no such recipe. Load the base with "
                "Load Checkpoint or Load Diffusion Model, or start ComfyUI with --disable-dynamic-vram")

    # -- sampling run ---------------------------------------------------------------------

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        model_sampling = self.inner_model.model_sampling
        # Reading the step's sigma is a device sync (the stock KSampler has none per step): only
        # done when some term is on for part of the run.
        self.read_sigma = not all(covers_whole_run(d.term.start_percent, d.term.end_percent) for d in self.domains)
        self.evaluation, self.differences = 0, {}
        prepared = []
        self._make_room_for_the_extra_rows(noise.shape, device)
        base_first(self.model_patcher, [d.term.model for d in self.domains if d.kind is DomainKind.MODEL])
        try:
            for d in self.domains:
                s, e = d.term.start_percent, d.term.end_percent
                d.interval = TermInterval(float(model_sampling.percent_to_sigma(s)), float(model_sampling.percent_to_sigma(e)))
                if d.kind is DomainKind.MODEL:
                    self._prepare_domain_model(d, sigmas)
                    prepared.append(d)
            self.calls = StepCalls(self.inner_model, self.model_options, lambda: self.conds, self.domains, sigmas,
                                   self.fast_mode, self.negative_is_null)
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
        except BaseException:
            # The host cleans up the models loaded with the conditioning after a run that ended well
            # (sampler_helpers.cleanup_models); after a failure or Cancel only the base's cleanup() runs.
            for d in prepared:
                d.term.model.cleanup()
            raise
        finally:
            self.calls = None  # (its records and graphs' references with it)
            OWNER.settle(device)  # the graphs kept for the next run: within the bound, the rest let go
            for d in prepared:
                d.term.model.restore_hook_patches()
                d.inner_model = None

    def _make_room_for_the_extra_rows(self, noise_shape, device) -> None:
        """The host made room for KSampler's two rows (prepare_sampling's estimate); the empty prompt's
        row and the domain rows come on top, and the recorded calls keep theirs in a CUDA-graph pool
        for the whole run. Ask the host's model management for that room too, as it does for its own
        rows: it unloads other models if it must, never the base or the domains of this run."""
        rows = sum(1 for d in self.domains if d.kind.evaluated)
        if rows == 0:
            return
        rows += 0 if self.negative_is_null else 1
        need = self.inner_model.memory_required([noise_shape[0] * rows] + list(noise_shape[1:]))
        ours = [self.model_patcher, *getattr(self, "loaded_models", [])]
        keep = [m for m in comfy.model_management.current_loaded_models if any(m.model is p for p in ours)]
        comfy.model_management.free_memory(need, device, keep_loaded=keep)

    def _prepare_domain_model(self, d: DomainState, sigmas):
        """Prepare a separately loaded domain model the way the host prepares the base."""
        patcher = d.term.model
        options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        options.setdefault("transformer_options", {})
        comfy.sampler_helpers.prepare_model_patcher(patcher, {"null": self.conds[d.key]}, options)
        options["transformer_options"]["sample_sigmas"] = sigmas
        comfy.samplers.cast_to_load_options(options, device=patcher.load_device, dtype=patcher.model_dtype())
        patcher.pre_run()
        d.inner_model = patcher.model
        d.model_options = options

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        """The guided prediction of one model evaluation: n + cfg (c - n) + sum_k w_k (d_k - u)."""
        active = self._active_domains(timestep)
        if not active:  # no domain term this step: the host's own sampling_function, KSampler exactly
            self.differences = {}
            return super().predict_noise(x, timestep, model_options, seed)
        evaluation, self.evaluation = self.evaluation, self.evaluation + 1
        cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        text = [self.conds.get("positive"), None if cfg1 else self.conds.get("negative")]  # c, n
        if self._reuses_differences(evaluation, active, x):
            # between two computations of the domain rows: KSampler's two rows plus each term's last d - u
            guided = self._text_guided(self.calls.text_rows(text, x, timestep, model_options), text, x, timestep, model_options)
            return add_domain_differences(guided, [(self.differences[d.index], d.term.weight) for d in active])
        rows = self.calls.step(text, active, x, timestep, model_options)  # c, n, u and the domain rows made with them
        guided = self._text_guided(rows.base, text, x, timestep, model_options)  # KSampler's n + cfg (c - n)
        u, domain = rows.null, rows.domains(active)  # every d_k
        if self.domain_every > 1:
            self.differences = {d.index: domain[d.index] - u for d in active}
        return add_domain_terms(guided, u, [GuidanceTerm(domain[d.index], d.term.weight) for d in active])

    def _active_domains(self, timestep) -> list[DomainState]:
        """The terms with a row to compute that are on at this step's noise level."""
        sigma = float(timestep.max()) if self.read_sigma else None
        return [d for d in self.domains if d.kind.evaluated and (sigma is None or is_active(d.interval, sigma))]

    def _reuses_differences(self, evaluation: int, active: list[DomainState], x) -> bool:
        """True where domain_every = k > 1 skips the domain rows at this evaluation and every active
        term has a last d - u of x's shape to reuse."""
        return self.domain_every > 1 and not recompute_domain(evaluation, self.domain_every) and \
            all(d.index in self.differences and self.differences[d.index].shape == x.shape for d in active)

    def _text_guided(self, out: list, text: list, x, timestep, model_options):
        """KSampler's guidance of the text rows out[:2] (after the model's pre-CFG functions, which may
        replace them in `out`), by the host's own cfg_function."""
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out[:2] = fn({"conds": text, "conds_out": out[:2], "cond_scale": self.cfg, "timestep": timestep,
                          "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                           model_options=model_options, cond=text[0], uncond=text[1])
