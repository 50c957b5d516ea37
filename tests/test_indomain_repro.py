"""The small-scale reproduction (experiments/indomain_repro.py), CPU configuration, on two seeds.

Pure (no host fixture): trains a class-conditional base and its text-free domain copy from
scratch on one CPU thread, for seeds 5 and 6 (data, training and sampling seeds all follow the
seed), then checks on each seed what held on every one of the five seeds that set the thresholds:

* ours (base for u and c, the domain copy only as the domain term) keeps control within a margin
  of the base;
* ours moves the samples to the domain: nearly all judged domain style, a Frechet distance to
  held-out domain images far below the base's and below naive fine-tuning's.

The thresholds come from seeds 0 to 4 (the CPU table in docs/EVIDENCE.md), never from the seeds the
test runs. There, per seed 0..4: base - ours control accuracy 0.031, 0.129, 0.074, 0.121, 0.059 (the
margin: 0.20); ours' domain rate 1.000, 1.000, 0.996, 0.988, 1.000 (> 0.9); FD ours / FD base 0.050,
0.176, 0.076, 0.104, 0.074 (< 0.3); FD ours / FD naive 0.059, 0.610, 0.284, 0.360, 0.061 (< 0.8).
Seeds 5 and 6 gave, when the test first ran them (after the thresholds were set): base - ours 0.137
and 0.188, domain rate 1.000 and 1.000, FD ours / FD base 0.145 and 0.101, FD ours / FD naive 0.488
and 0.159.

Not asserted: that naive fine-tuning forgets control. It did on seeds 0 and 1 (base - naive 0.281,
0.379, the only seeds this test ran before, on which its old FORGETTING = 0.20 was set), but not on
seeds 2, 3 and 4 (-0.062, 0.164, 0.152): at this scale (300 fine-tuning steps of a small model)
forgetting is real on average (docs/EVIDENCE.md: 0.759 -> 0.577) but not on every seed.

The competitors and the other rows of the table are left out here (competitors=False, one domain
weight, no intervals): the rows asserted on cost what one seed cost before. The two seeds run in two
processes of one thread each, side by side: on an idle 2-core machine about as long as one seed
alone; every number is seeded, and on one thread the result does not vary from run to run.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from experiments.indomain_repro import CONFIGS, run

pytestmark = pytest.mark.cpu_tier  # no GPU code: the GPU tier (--gpu) leaves it out

# Thresholds from seeds 0..4 (module docstring); the test runs seeds 5 and 6.
SEEDS = (5, 6)
TEST_CONFIG = dataclasses.replace(CONFIGS["cpu"], competitors=False, domain_weights=(1.5,), domain_intervals=())
CONTROL_MARGIN = 0.20  # ours may lose less than this much control accuracy against the base (seen: <= 0.129)
DOMAIN_RATE = 0.9  # at least this fraction of ours' samples judged domain style (seen: >= 0.988)
FD_VS_BASE = 0.3  # ours' FD to the domain under this fraction of the base's (seen: <= 0.176)
FD_VS_NAIVE = 0.8  # and under this fraction of naive fine-tuning's (seen: <= 0.610)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """seed -> the results of the CPU configuration with that seed (two processes, one thread each)."""
    out = tmp_path_factory.mktemp("indomain_repro")
    configs = [dataclasses.replace(TEST_CONFIG, seed=seed) for seed in SEEDS]
    with ProcessPoolExecutor(len(SEEDS), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run, configs, [out / f"seed{seed}" for seed in SEEDS], ["cpu"] * len(SEEDS)))
    for seed, res in zip(SEEDS, results):
        assert json.loads((out / f"seed{seed}" / "results.json").read_text())["methods"] == res["methods"]
        assert (out / f"seed{seed}" / "samples.png").stat().st_size > 0
    return dict(zip(SEEDS, results))


@pytest.fixture(params=SEEDS, ids=lambda seed: f"seed{seed}")
def results(request, runs):
    return runs[request.param]


def _method(results, name, weight=None):
    for m in results["methods"]:
        if m["method"] == name and m["domain_weight"] == weight:
            return m
    raise KeyError((name, weight))


def test_the_evaluation_network_is_trustworthy(results):
    ref = results["reference"]
    assert ref["shape_acc_real"] > 0.9 and ref["style_acc_real"] > 0.95, ref
    assert ref["fd_real_domain"] * 10 < ref["fd_real_base"], ref


def test_ours_keeps_control_and_reaches_the_domain(results):
    base, naive = _method(results, "base"), _method(results, "naive fine-tune")
    ours = _method(results, "ours", results["headline_weight"])
    assert ours["control_accuracy"] > base["control_accuracy"] - CONTROL_MARGIN, (base, ours)
    assert ours["domain_rate"] > DOMAIN_RATE, ours
    assert ours["fd_domain"] < FD_VS_BASE * base["fd_domain"], (base, ours)
    assert ours["fd_domain"] < FD_VS_NAIVE * naive["fd_domain"], (naive, ours)


def test_the_committed_evidence_came_from_the_gpu_configuration():
    """docs/evidence/results.json records the configuration it ran; `--config gpu` must still be it,
    so that the command in docs/EVIDENCE.md repeats the table."""
    import dataclasses
    from pathlib import Path

    recorded = json.loads((Path(__file__).parents[1] / "docs" / "evidence" / "results.json").read_text())["config"]
    current = json.loads(json.dumps(dataclasses.asdict(CONFIGS["gpu"])))  # tuples -> lists, as recorded
    assert {k: current[k] for k in recorded} == recorded
