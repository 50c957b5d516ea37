"""domain_every, the opt-in speed dial (issue 16): the domain rows and the empty prompt's row on
every k-th model evaluation only, each term's last d - u reused in between (guidance.combine)."""
import os

import pytest
import torch

from tests.support import tiny_nodes as tiny
from tests.support.graphs import close, loader, text_to_image

STEPS = 6  # Euler: one model evaluation per step


@pytest.fixture(scope="module")
def domain_file(comfy):
    d = comfy.model_dir("domain_unets")
    return os.path.basename(tiny.write_safetensors(os.path.join(d, "every_domain.safetensors"), tiny.domain_state_dict()))


def sample(comfy, monkeypatch, domain_file, every=None, scale=2.0, fast=True, rows=None):
    """The LATENT; rows: a list that gets (which model, batch rows) of every UNet call."""
    from comfy.model_base import BaseModel

    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "1" if fast else "0")
    prompt = text_to_image(steps=STEPS, domain=["dom", 0], domain_scale=scale, extra={"dom": loader(domain_file)})
    if every is not None:
        prompt["sample"]["inputs"]["domain_every"] = every
    real = BaseModel.apply_model
    if rows is not None:
        base = tiny.tiny_model().model

        def counted(self, x, t, *args, **kwargs):
            rows.append(("base" if self is base else "domain", int(x.shape[0])))
            return real(self, x, t, *args, **kwargs)
        BaseModel.apply_model = counted
    try:
        return comfy.run(prompt)["captured"]["out"]["samples"]
    finally:
        BaseModel.apply_model = real


def test_every_one_is_the_exact_formula_bit_for_bit(comfy, monkeypatch, domain_file):
    assert torch.equal(sample(comfy, monkeypatch, domain_file, every=1), sample(comfy, monkeypatch, domain_file))


@pytest.mark.parametrize("every", [2, 3])
def test_the_domain_and_empty_prompt_rows_run_every_kth_evaluation_only(comfy, monkeypatch, domain_file, every):
    rows = []
    sample(comfy, monkeypatch, domain_file, every=every, fast=False, rows=rows)
    computed = len(range(0, STEPS, every))  # evaluations 0, k, 2k, ...
    assert [r for r in rows if r[0] == "domain"] == [("domain", 1)] * computed
    base = [n for who, n in rows if who == "base"]
    assert sorted(base) == sorted([3] * computed + [2] * (STEPS - computed))  # [c, n, u] or KSampler's [c, n]


@pytest.mark.parametrize("every", [2, 3])
def test_the_fast_path_gives_the_straightforward_paths_samples(comfy, monkeypatch, domain_file, every):
    slow = sample(comfy, monkeypatch, domain_file, every=every, fast=False)
    fast = sample(comfy, monkeypatch, domain_file, every=every, fast=True)
    assert close(fast, slow, rel=1e-6)


def test_reusing_the_difference_stays_near_the_exact_sample(comfy, monkeypatch, domain_file):
    """The reused d - u is an approximation: its sample lies far closer to the exact one than the
    sample without the domain term does."""
    exact = sample(comfy, monkeypatch, domain_file)
    every2 = sample(comfy, monkeypatch, domain_file, every=2)
    without = sample(comfy, monkeypatch, domain_file, scale=0.0)
    assert not torch.equal(every2, exact)
    assert (every2 - exact).norm() < 0.5 * (without - exact).norm()


def test_a_term_outside_its_interval_computes_afresh_when_it_is_on_again(comfy, monkeypatch, domain_file):
    """Two terms, the second on the later half only: when it comes on, its rows are computed at once,
    whatever the count says (no difference of it is known yet)."""
    rows = []
    prompt_extra = {"term": {"class_type": "InDomainTerm", "inputs": {"domain_model": ["dom", 0], "weight": 1.0,
                                                                      "start_percent": 0.5, "end_percent": 1.0}}}
    from comfy.model_base import BaseModel

    monkeypatch.setenv("INDOMAIN_FAST_DOMAIN", "0")
    prompt = text_to_image(steps=STEPS, domain=["dom", 0], domain_scale=2.0,
                           extra={"dom": loader(domain_file), **prompt_extra})
    prompt["sample"]["inputs"].update(domain_every=50, more_domains=["term", 0])
    real = BaseModel.apply_model
    base = tiny.tiny_model().model
    monkeypatch.setattr(BaseModel, "apply_model",
                        lambda self, x, t, *a, **k: rows.append("base" if self is base else "domain") or real(self, x, t, *a, **k))
    out = comfy.run(prompt)["captured"]["out"]["samples"]
    assert torch.isfinite(out).all()
    # the first evaluation (term 1) and the first evaluation of the second half (both terms afresh)
    assert rows.count("domain") == 1 + 2
