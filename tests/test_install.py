"""Install as a user does: a clean clone in custom_nodes/, the requirements installed with the
host's pip, ComfyUI started from main.py. The pack imports without error and every node is
documented in what the front end reads (/object_info)."""
import os
import re
import subprocess

import pytest

from tests.support import live_server

pytestmark = pytest.mark.cpu_tier  # no GPU code: the GPU tier (--gpu) leaves it out

PREFIX = "InDomain"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.fixture(scope="module")
def pack_nodes(object_info):
    return {k: v for k, v in object_info.items() if k.startswith(PREFIX)}


def test_the_pack_is_a_clean_clone_of_head(comfy_server):
    assert os.path.isdir(os.path.join(comfy_server.pack_dir, ".git"))
    head = subprocess.run(["git", "-C", comfy_server.pack_dir, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == comfy_server.commit
    status = subprocess.run(["git", "-C", comfy_server.pack_dir, "status", "--porcelain"], capture_output=True, text=True).stdout
    assert status == ""
    # requirements were installed with the host's pip without error (install() raises otherwise)
    assert "ERROR:" not in comfy_server.install_output


def test_comfyui_imports_the_pack_without_error(comfy_server):
    log = comfy_server.log()
    assert comfy_server.process.poll() is None, log[-3000:]
    # the host's custom-node report: "   0.1 seconds: <base>/custom_nodes/comfyui-indomain"
    lines = [line for line in log.splitlines() if line.rstrip().endswith(os.path.join("custom_nodes", live_server.PACK_NAME))]
    assert lines, f"the pack is not in the custom-node import report:\n{log[-3000:]}"
    assert not any("IMPORT FAILED" in line for line in lines), lines
    failures = [line for line in log.splitlines() if ("IMPORT FAILED" in line or "Cannot import" in line)
                and live_server.PACK_NAME in line]
    assert failures == []
    # no traceback passes through the pack's files
    assert os.path.join("custom_nodes", live_server.PACK_NAME) not in _tracebacks(log)


def _tracebacks(log: str) -> str:
    """The text of every traceback in the log."""
    return "\n".join(re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+.*", log))


def test_object_info_lists_every_node_of_the_pack(comfy_server, pack_nodes):
    declared = live_server.pack_node_ids(comfy_server.pack_dir)
    assert declared and all(n.startswith(PREFIX) for n in declared)
    assert set(pack_nodes) == declared
    for name, info in pack_nodes.items():
        assert info["python_module"] == f"custom_nodes.{live_server.PACK_NAME}", name


def test_every_node_is_documented_under_one_category_root(pack_nodes):
    roots = {info["category"].split("/")[0] for info in pack_nodes.values()}
    assert roots == {"in-domain"}
    for name, info in pack_nodes.items():
        assert info["display_name"].strip() and info["display_name"] != name, name
        assert len(info["description"].strip()) >= 30, (name, info["description"])
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert inputs, f"{name} has no inputs"
        undocumented = [i for i, spec in inputs.items() if len(spec) < 2 or not str(spec[1].get("tooltip", "")).strip()]
        assert undocumented == [], f"{name}: inputs without a tooltip: {undocumented}"
        assert info["output"], f"{name} has no outputs"
        assert len(info["output_tooltips"]) == len(info["output"]) and all(t and t.strip() for t in info["output_tooltips"]), name
