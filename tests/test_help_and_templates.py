"""Help and templates where users look for them, served by a running ComfyUI (main.py, the pack
installed from a clean clone of HEAD):

- every node's help page, web/docs/<node id>.md, at the URL the front end's node library info panel
  fetches: /extensions/<pack folder>/docs/<node id>.md (its python_module names the folder);
- every workflow of example_workflows/ listed by /api/workflow_templates under the pack's folder
  name (the Templates dialog's "Custom Nodes" section), with its .json and its <name>.jpg thumbnail.
"""
from __future__ import annotations

import glob
import io
import json
import os

import pytest
from PIL import Image

from tests.support import live_server

pytestmark = pytest.mark.cpu_tier  # no GPU code: the GPU tier (--gpu) leaves it out

DOCS = os.path.join(live_server.REPO, "web", "docs")
TEMPLATES = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(live_server.REPO, "example_workflows", "*.json")))


def help_url(info: dict) -> str:
    """The front end's getNodeHelpBaseUrl + <node id>.md for a custom node (1.35 and 1.49)."""
    pack = info["python_module"].split(".")[1].split("@")[0]
    return f"/extensions/{pack}/docs/{info['name']}.md"


@pytest.fixture(scope="module")
def pack_nodes(comfy_server):
    return {k: v for k, v in comfy_server.get("/object_info").items() if k.startswith("InDomain")}


def test_every_node_has_a_help_page_with_formula_weights_and_graph():
    declared = live_server.pack_node_ids(live_server.REPO)
    assert declared and {f[:-3] for f in os.listdir(DOCS)} == declared
    for node_id in declared:
        with open(os.path.join(DOCS, node_id + ".md"), encoding="utf-8") as f:
            text = f.read()
        assert text.startswith("# "), node_id
        assert "n + cfg · (c − n) + Σₖ wₖ · (dₖ − u)" in text, node_id  # the formula
        assert "bit for bit" in text and "1.5–2.5" in text, node_id  # weight 0 = KSampler; the paper's range
        assert "## A small graph" in text and "```" in text, node_id


def test_the_server_serves_each_help_page_where_the_info_panel_fetches_it(comfy_server, pack_nodes):
    assert set(pack_nodes) == live_server.pack_node_ids(live_server.REPO)
    for node_id, info in pack_nodes.items():
        status, _, body = comfy_server.fetch(help_url(info))
        assert status == 200, (node_id, help_url(info), status)
        with open(os.path.join(DOCS, node_id + ".md"), encoding="utf-8") as f:
            assert body.decode("utf-8") == f.read(), node_id
    assert comfy_server.fetch(f"/extensions/{live_server.PACK_NAME}/docs/NoSuchNode.md")[0] == 404


def test_the_templates_are_listed_under_the_pack_with_their_thumbnails(comfy_server):
    listed = comfy_server.get("/api/workflow_templates")
    assert sorted(listed[live_server.PACK_NAME]) == TEMPLATES and len(TEMPLATES) >= 5
    for name in TEMPLATES:
        status, _, body = comfy_server.fetch(f"/api/workflow_templates/{live_server.PACK_NAME}/{name}.json")
        assert status == 200 and json.loads(body)["nodes"], name
        status, kind, body = comfy_server.fetch(f"/api/workflow_templates/{live_server.PACK_NAME}/{name}.jpg")
        assert status == 200 and kind == "image/jpeg", (name, status, kind)
        assert Image.open(io.BytesIO(body)).size == (400, 300)
