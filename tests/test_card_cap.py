"""The card tables' runs (issues 33 and 37): a GPU held to a smaller card for the benchmarks
(`--card-gib N` of bench/sampling.py and bench/training.py, tests/support/host.py's hold_to_card):
the host's --reserve-vram takes the rest of the GPU and the process's CUDA allocations are capped
at the card, so the host loads, offloads and runs out of memory as on that card."""
import json
import os
import subprocess
import sys

import pytest

from tests.support.host import card_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def test_the_rest_of_the_gpu_is_reserved_and_the_process_capped_at_the_card():
    assert card_settings(80 * GIB, 8) == (72.0, 0.1)
    reserve, fraction = card_settings(int(79.19 * GIB), 12)
    assert abs(reserve - 67.19) < 1e-9 and abs(fraction * 79.19 - 12) < 1e-9
    for bad in (0, -1, 80, 96):
        with pytest.raises(ValueError, match=f"a card of {bad} GiB: it must be above 0 and below this GPU's 80.0 GiB"):
            card_settings(80 * GIB, bad)


@pytest.mark.cpu_tier
@pytest.mark.parametrize("script", ["bench.sampling", "bench.training"])
def test_without_a_gpu_the_benchmarks_refuse_a_card_before_starting_the_host(tmp_path, script):
    cpu = ["--cpu"] if script == "bench.sampling" else []  # (bench.training: this machine has no GPU)
    p = subprocess.run([sys.executable, "-m", script, "--quick", *cpu, "--card-gib", "8", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--card-gib holds a CUDA GPU to a smaller card" in p.stderr, p.stderr[-2000:]
    assert os.listdir(tmp_path) == []


@pytest.mark.gpu
def test_on_a_gpu_a_capped_run_records_its_card(tmp_path):
    """The tiny models sampled on a 2 GiB card: the run finishes and says how the GPU was held."""
    p = subprocess.run([sys.executable, "-m", "bench.sampling", "--quick", "--models", "sd15", "--batches", "1",
                        "--card-gib", "2", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    card = json.load(open(tmp_path / "sampling.json"))["meta"]["card"]
    assert card["card_gib"] == 2 and abs(card["reserve_vram_gib"] + 2 - card["gpu_gib"]) < 0.01
