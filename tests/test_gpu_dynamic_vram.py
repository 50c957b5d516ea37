"""The fast path under ComfyUI's dynamic VRAM (0.33+, its default on NVIDIA): CUDA graphs over
the weight slots (nodes/dynamic_vram.py), checked in a fresh process started as main.py starts
the host (tests/dynamic_vram_check.py, SD1.5-size UNets loaded from files). GPU tier only;
skipped, saying why, on a host without dynamic VRAM (0.8.0)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic") / "report.json"
    run = subprocess.run([sys.executable, "-m", "tests.dynamic_vram_check", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    if run.returncode == 77:
        pytest.skip("this host has no dynamic VRAM (ComfyUI before 0.33, or not NVIDIA)")
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("domain", ["full", "lora"])
def test_under_dynamic_vram_the_domain_and_base_rows_are_cuda_graphs(report, domain):
    case = next(c for c in report["cases"] if c["domain"] == domain)
    assert report["patcher"] == "ModelPatcherDynamic"
    graphs = [line for line in case["fast_lines"] if "fast path (graph" in line]
    assert any(line.startswith("domain") for line in graphs), case["fast_lines"]
    assert any(line.startswith("base model") for line in graphs), case["fast_lines"]


@pytest.mark.parametrize("domain", ["full", "lora"])
def test_under_dynamic_vram_the_graphs_give_the_straightforward_guiders_samples(report, domain):
    case = next(c for c in report["cases"] if c["domain"] == domain)
    assert case["finite"]
    assert case["fast_vs_ref_rel"] < 2e-3, case


@pytest.mark.parametrize("domain", ["full", "lora"])
def test_weights_evicted_mid_run_are_called_directly_with_the_same_samples(report, domain):
    case = next(c for c in report["cases"] if c["domain"] == domain)
    assert sum(case["freed_bytes"]) > 0, "the eviction freed nothing: the test did not evict"
    # After the host's memory pressure the rest of the run may stream the weights (its watermark is
    # reset after the node): either way the samples are those of the undisturbed run.
    evicted = [line for line in case["evicted_lines"] if "evicted from VRAM" in line]
    assert any(line.startswith("domain") for line in evicted) and any(line.startswith("base") for line in evicted), evicted
    assert case["evicted_vs_fast_rel"] < 1e-3, case
