"""The small-scale reproduction (experiments/indomain_repro.py), CPU configuration.

Pure (no host fixture): trains a class-conditional base and its text-free domain copy from
scratch with fixed seeds on one CPU thread, then checks the direction of the paper's claim:

* naive fine-tuning (the domain copy sampled alone with CFG) loses text (class) control;
* ours (base for u and c, the domain copy only as the domain term) keeps control within a
  margin of the base, and moves the samples to the domain (Frechet distance to held-out
  domain images far below the base's).

About 2.5 to 4 minutes on one thread of the (shared) 2-core machine it was written on; every
number is seeded, and on one thread the result does not vary from run to run.
"""
from __future__ import annotations

import json

import pytest

from experiments.indomain_repro import CONFIGS, run

pytestmark = pytest.mark.cpu_tier  # no GPU code: the GPU tier (--gpu) leaves it out

# Margins from seeds 0 and 1 of the CPU configuration (docs/EVIDENCE.md): base - naive was 0.32
# and 0.38, base - ours 0.03 and 0.13, FD ours / FD base 0.05 and 0.18. The test runs seed 0.
CONTROL_MARGIN = 0.20  # ours may lose less than this much control accuracy against the base
FORGETTING = 0.20  # naive fine-tuning loses at least this much
SEPARATION = 0.15  # ours beats naive by more than this


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("indomain_repro")
    res = run(CONFIGS["cpu"], out, device="cpu")
    assert json.loads((out / "results.json").read_text())["methods"] == res["methods"]
    assert (out / "samples.png").stat().st_size > 0
    return res


def _method(results, name, weight=None):
    for m in results["methods"]:
        if m["method"] == name and m["domain_weight"] == weight:
            return m
    raise KeyError((name, weight))


def test_the_evaluation_network_is_trustworthy(results):
    ref = results["reference"]
    assert ref["shape_acc_real"] > 0.9 and ref["style_acc_real"] > 0.95, ref
    assert ref["fd_real_domain"] * 10 < ref["fd_real_base"], ref


def test_naive_fine_tuning_forgets_control(results):
    base, naive = _method(results, "base"), _method(results, "naive fine-tune")
    assert naive["control_accuracy"] < base["control_accuracy"] - FORGETTING, (base, naive)


def test_ours_keeps_control_and_reaches_the_domain(results):
    base, naive = _method(results, "base"), _method(results, "naive fine-tune")
    ours = _method(results, "ours", results["headline_weight"])
    assert ours["control_accuracy"] > base["control_accuracy"] - CONTROL_MARGIN, (base, ours)
    assert ours["control_accuracy"] > naive["control_accuracy"] + SEPARATION, (naive, ours)
    assert ours["fd_domain"] < 0.3 * base["fd_domain"], (base, ours)
    assert ours["domain_rate"] > 0.9, ours


def test_the_committed_evidence_came_from_the_gpu_configuration():
    """docs/evidence/results.json records the configuration it ran; `--config gpu` must still be it,
    so that the command in docs/EVIDENCE.md repeats the table."""
    import dataclasses
    from pathlib import Path

    recorded = json.loads((Path(__file__).parents[1] / "docs" / "evidence" / "results.json").read_text())["config"]
    current = json.loads(json.dumps(dataclasses.asdict(CONFIGS["gpu"])))  # tuples -> lists, as recorded
    assert {k: current[k] for k in recorded} == recorded
