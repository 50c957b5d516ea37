"""scripts/setup.sh and scripts/test.sh inside the ComfyUI installs users have, run against fake
installs of each layout: the pack at ComfyUI/custom_nodes/comfyui-indomain, the host two folders up,
its Python in .venv/, venv/ (bin/ or Windows' Scripts/), the portable build's python_embeded/ beside
it, or PYTHON. The fake Pythons log how they were called; each layout the scripts cannot use is named
in their message, and with no ComfyUI at all they say how to get one.

The registry's check (scripts/validate.sh, `comfy node validate` from comfy-cli in its own virtual
environment) passes on the pack and fails on a copy with a broken pyproject.toml or an eval()."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu_tier  # no GPU code: the GPU tier (--gpu) leaves it out

REPO = Path(__file__).resolve().parents[1]
PACK_FILES = ("scripts/host.sh", "scripts/setup.sh", "scripts/test.sh", "scripts/validate.sh", "requirements.txt")

FAKE_PYTHON = """#!/usr/bin/env bash
# A fake interpreter: logs each call; imports succeed except those named in $0.missing.
echo "$0 $* | COMFYUI_PATH=${COMFYUI_PATH:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-}" >> "$FAKE_LOG"
if [ "$1" = -c ]; then
  for m in $(cat "$0.missing" 2>/dev/null); do case "$2" in *"import $m"*) exit 1 ;; esac; done
fi
exit 0
"""


def fake_python(path: Path, missing: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    if missing:
        Path(f"{path}.missing").write_text(missing)
    return path


def comfyui(root: Path) -> Path:
    """A folder the scripts take for ComfyUI, with this pack in its custom_nodes/."""
    (root / "comfy").mkdir(parents=True)
    (root / "comfy" / "samplers.py").write_text("")
    (root / "main.py").write_text("")
    pack = root / "custom_nodes" / "comfyui-indomain"
    for name in PACK_FILES:
        (pack / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, pack / name)
    cli = pack / ".tools" / "comfy-cli" / "bin" / "comfy"  # present: setup leaves comfy-cli alone
    fake_python(cli)
    return pack


def run(pack: Path, script: str, *args: str, **env: str) -> tuple[int, str, list[str]]:
    log = pack.parent.parent / "calls.log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items()
            if k not in ("COMFYUI_PATH", "PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX", "CI", "TEST_WORKERS", "OMP_NUM_THREADS")}
    base.update(FAKE_LOG=str(log), CHROMIUM="/bin/true", INDOMAIN_DEV_HOST=str(pack / "no-dev-host"), **env)
    p = subprocess.run(["bash", str(pack / "scripts" / script), *args], env=base, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return p.returncode, p.stdout + p.stderr, calls


def installs(calls: list[str], python: Path) -> list[str]:
    return [c for c in calls if c.startswith(f"{python} ") and " pip install " in c]


@pytest.mark.parametrize("layout", [".venv/bin/python", "venv/bin/python", ".venv/Scripts/python.exe", "venv/Scripts/python.exe"])
def test_setup_and_tests_use_the_python_of_the_comfyui_two_folders_up(tmp_path, layout):
    pack = comfyui(tmp_path / "ComfyUI")
    py = fake_python(tmp_path / "ComfyUI" / layout)
    rc, out, calls = run(pack, "setup.sh")
    assert rc == 0, out
    assert f"{py} -m pip install -q -r requirements.txt pytest>=7.3 pytest-xdist" in "\n".join(calls), calls
    rc, out, calls = run(pack, "test.sh", "-x")
    assert rc == 0, out
    pytest_calls = [c for c in calls if " -m pytest " in c]
    assert pytest_calls == [f"{py} -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile -x"
                            f" | COMFYUI_PATH={tmp_path / 'ComfyUI'} OMP_NUM_THREADS={max(1, os.cpu_count() // 2)}"], calls


def test_the_portable_build_installs_with_its_embedded_python(tmp_path):
    portable = tmp_path / "ComfyUI_windows_portable"
    pack = comfyui(portable / "ComfyUI")
    py = fake_python(portable / "python_embeded" / "python.exe")
    rc, out, calls = run(pack, "setup.sh")
    assert rc == 0, out
    assert installs(calls, py) and all(c.startswith(f"{py} -s -m pip install") for c in installs(calls, py)), calls
    rc, out, calls = run(pack, "test.sh")
    assert rc == 0 and any(c.startswith(f"{py} -m pytest tests") for c in calls), (out, calls)


def test_a_python_without_torch_is_passed_over_and_named_when_none_is_left(tmp_path):
    pack = comfyui(tmp_path / "ComfyUI")
    bare = fake_python(tmp_path / "ComfyUI" / ".venv" / "bin" / "python", missing="torch")
    good = fake_python(tmp_path / "ComfyUI" / "venv" / "bin" / "python")
    rc, out, calls = run(pack, "setup.sh")
    assert rc == 0 and installs(calls, good) and not installs(calls, bare), (out, calls)

    good.unlink()
    broken = tmp_path / "ComfyUI" / "venv" / "bin" / "python"
    broken.write_text("not a program")
    broken.chmod(0o755)
    rc, out, calls = run(pack, "setup.sh")
    assert rc == 2 and not any(" pip install " in c for c in calls), (out, calls)
    assert f"{bare}: runs, but cannot import torch" in out, out
    assert f"{broken}: there, but it does not run on this machine" in out, out
    assert f"{tmp_path / 'python_embeded' / 'python.exe'}: not there" in out, out
    assert "Set PYTHON" in out, out
    rc, out2, _ = run(pack, "test.sh")
    assert rc == 2 and f"{bare}: runs, but cannot import torch" in out2, out2


def test_python_and_comfyui_path_override_the_layout_and_are_named_when_wrong(tmp_path):
    pack = comfyui(tmp_path / "ComfyUI")
    fake_python(tmp_path / "ComfyUI" / ".venv" / "bin" / "python")
    other = fake_python(tmp_path / "elsewhere" / "bin" / "python3")
    rc, out, calls = run(pack, "test.sh", PYTHON=str(other))
    assert rc == 0 and any(c.startswith(f"{other} -m pytest") for c in calls), (out, calls)

    rc, out, _ = run(pack, "setup.sh", PYTHON=str(tmp_path / "nowhere" / "python"))
    assert rc == 2 and f"PYTHON={tmp_path / 'nowhere' / 'python'}: not there" in out, out

    host2 = tmp_path / "Other"
    comfyui(host2)
    py2 = fake_python(host2 / ".venv" / "bin" / "python")
    rc, out, calls = run(pack, "setup.sh", COMFYUI_PATH=str(host2))
    assert rc == 0 and installs(calls, py2), (out, calls)
    rc, out, _ = run(pack, "setup.sh", COMFYUI_PATH=str(tmp_path / "elsewhere"))
    assert rc == 2 and f"COMFYUI_PATH={tmp_path / 'elsewhere'} is not a ComfyUI folder" in out, out


def test_without_any_comfyui_the_scripts_say_how_to_get_one(tmp_path):
    pack = comfyui(tmp_path / "ComfyUI")
    loose = tmp_path / "download" / "comfyui-indomain"
    shutil.copytree(pack, loose)
    for script in ("setup.sh", "test.sh"):
        rc, out, calls = run(loose, script)
        assert rc == 2 and not calls, (script, out, calls)
        assert "No ComfyUI found" in out and "git clone https://github.com/comfyanonymous/ComfyUI" in out, out
        assert "custom_nodes/comfyui-indomain" in out and "COMFYUI_PATH=" in out, out

    (tmp_path / "ComfyUI" / "main.py").unlink()  # in custom_nodes/ of a folder that is not ComfyUI
    rc, out, _ = run(pack, "test.sh")
    assert rc == 2 and f"{tmp_path / 'ComfyUI'} is not a ComfyUI folder" in out, out


@pytest.mark.parametrize("how", ["--gpu flag", "one worker", "no xdist"])
def test_the_tests_run_in_one_process_on_the_gpu_with_one_worker_or_without_xdist(tmp_path, how):
    pack = comfyui(tmp_path / "ComfyUI")
    py = fake_python(tmp_path / "ComfyUI" / ".venv" / "bin" / "python", missing="xdist" if how == "no xdist" else "")
    args, env = (["--gpu"], {}) if how == "--gpu flag" else ([], {"TEST_WORKERS": "1"} if how == "one worker" else {})
    rc, out, calls = run(pack, "test.sh", *args, **env)
    pytest_calls = [c.split(" | ")[0] for c in calls if " -m pytest " in c]
    assert rc == 0 and pytest_calls == [f"{py} -m pytest tests -q -p no:cacheprovider" + (" --gpu" if args else "")], (out, calls)
    assert ("pytest-xdist is not installed" in out) == (how == "no xdist"), out


def comfy_cli() -> str | None:
    path = REPO / ".tools" / "comfy-cli" / "bin" / "comfy"
    if path.exists():
        return str(path)
    if os.environ.get("CI"):
        pytest.fail("comfy-cli missing at .tools/comfy-cli (bash scripts/setup.sh installs it; CI needs it)")
    pytest.skip("comfy-cli is not installed at .tools/comfy-cli (bash scripts/setup.sh installs it)")


def test_the_registry_check_passes_on_the_pack_and_fails_on_a_broken_copy(tmp_path):
    cli = comfy_cli()
    validate = ["bash", str(REPO / "scripts" / "validate.sh")]
    env = dict(os.environ, COMFY_CLI=cli)
    ok = subprocess.run(validate, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "passed successfully" in ok.stdout, ok.stdout + ok.stderr

    for name, broken in {"no version": lambda t: t.replace('version = "', 'version = "" # "'),
                         "eval": None}.items():
        copy = tmp_path / name.replace(" ", "_")
        copy.mkdir()
        text = (REPO / "pyproject.toml").read_text()
        (copy / "pyproject.toml").write_text(broken(text) if broken else text)
        if not broken:
            (copy / "loader.py").write_text('settings = eval(open("settings.txt").read())\n')
        p = subprocess.run([*validate, str(copy)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 1, (name, p.stdout + p.stderr)
        assert ("project version is empty" if broken else "S307") in p.stdout + p.stderr, (name, p.stdout + p.stderr)
