"""The workflows in ComfyUI's real front end (the host's comfyui-frontend-package, served by the
running server), driven by headless Chromium over the DevTools protocol.

Every workflow in example_workflows/ loads with no missing node type, no widget value outside its
options or range, its widget values kept, no node overlapping another, every node in view, no
dialog or warning toast, and no console error; a screenshot of each goes to
tests/_out/browser/<workflow>.png. One workflow, shrunk to a few steps at 64x64, is queued from
the page and its image appears in the Save Image node. Deliberately broken workflows must make
these checks fail.

Without Chromium these tests are skipped (scripts/setup.sh installs it), except under CI=...,
where a missing browser is a failure.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil

import pytest
from PIL import Image

from tests.support import live_server
from tests.support.cdp import Browser

pytestmark = pytest.mark.cpu_tier  # no GPU code: the GPU tier (--gpu) leaves it out

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = os.path.join(live_server.REPO, "tests", "_out", "browser")
WORKFLOWS = {os.path.basename(p)[:-5]: p for p in live_server.workflow_paths()}
RUN_WORKFLOW = "text_to_image_domain"
# The host's page asks for these on every start and the server has none: 404s of a bare ComfyUI.
HOST_404S = ("/user.css", "/favicon.ico")
# Newer front ends (1.49) open a template on first start and ask huggingface.co for its models'
# metadata, which the host's Content-Security-Policy (connect-src 'self') blocks: the host's own
# start page, before any workflow of this pack is loaded.
EXTERNAL_BLOCKED = re.compile(r"(Connecting to|Fetch API cannot load) '?https://")


# Logged by front end 1.49's own start-up code (ComfyApp.rootGraph read before the graph exists);
# this suite reads app.canvas.graph until the graph is there, never rootGraph.
FRONT_END_STARTUP = "ComfyApp graph accessed before initialization"


def host_noise(error: str) -> bool:
    return (("404" in error and error.endswith(HOST_404S)) or bool(EXTERNAL_BLOCKED.search(error))
            or error.endswith(FRONT_END_STARTUP))


@pytest.fixture(scope="session")
def chromium():
    if os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    message = (f"no Chromium at {CHROMIUM}: `bash scripts/setup.sh` installs Debian's chromium "
               "(or set CHROMIUM to a Chromium/Chrome binary)")
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: the browser tests must run)")
    pytest.skip(message)


class FrontEnd:
    """The ComfyUI page in headless Chromium; sync wrappers around the async CDP page."""

    def __init__(self, loop, page, server):
        self.loop, self.page, self.server = loop, page, server
        self.startup_errors: list[str] = []

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def evaluate(self, expression: str, timeout: float = 60.0):
        return self.run(self.page.evaluate(expression, timeout))

    def wait_for(self, expression: str, timeout: float = 30.0):
        return self.run(self.page.wait_for(expression, timeout))

    def screenshot(self, name: str) -> str:
        return self.run(self.page.screenshot(os.path.join(SHOTS, f"{name}.png")))

    def load(self, workflow: dict, name: str) -> list[str]:
        """Load a UI-format workflow as a user opens it; the list of problems the page shows."""
        self.evaluate(DISMISS_JS)
        self.page.console.clear()
        self.evaluate(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)})")
        self.evaluate(SETTLE_JS)
        report = self.evaluate(CHECK_JS)
        problems = [f"{kind}: {item}" for kind, items in report.items() for item in items]
        problems += [f"widget values changed by the front end: {p}" for p in self._changed_values(workflow)]
        problems += [f"console: {e}" for e in self.page.console_errors() if not host_noise(e)]
        return problems

    def _changed_values(self, workflow: dict) -> list[str]:
        loaded = {n["id"]: n for n in self.evaluate("app.graph.serialize()")["nodes"]}
        changed = []
        for node in workflow["nodes"]:
            now = loaded.get(node["id"], {}).get("widgets_values", [])
            if (node.get("widgets_values") or []) != (now or []):
                changed.append(f"{node['type']} ({node['id']}): {node.get('widgets_values')} -> {now}")
        return changed


SETTLE_JS = """new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(resolve, 400))))"""

DISMISS_JS = """(async () => {
  for (let i = 0; i < 20; i++) {
    const open = Array.from(document.querySelectorAll('.p-dialog')).filter(d => d.getBoundingClientRect().width > 0);
    if (!open.length) return true;
    for (const d of open) {
      const close = d.querySelector('.p-dialog-close-button, [aria-label=Close], button[aria-label="close"]');
      if (close) close.click();
      else document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}));
    }
    await new Promise(r => setTimeout(r, 100));
  }
  return false;
})()"""

# What the page shows after a load: each key a kind of problem, each item one problem.
CHECK_JS = r"""(() => {
  const problems = {"missing node type": [], "node flagged with errors": [], "widget value": [],
                    "overlapping nodes": [], "node out of view": [], "dialog": [], "toast": []};
  const nodes = app.graph.nodes;
  const label = n => `${n.type} (${n.id})`;
  for (const n of nodes) {
    if (!(n.type in LiteGraph.registered_node_types)) problems["missing node type"].push(label(n));
    if (n.has_errors) problems["node flagged with errors"].push(label(n));
    for (const w of n.widgets || []) {
      const o = w.options || {};
      let values = o.values;
      if (typeof values === 'function') values = values(w, n);
      if (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value))
        problems["widget value"].push(`${label(n)}.${w.name} = ${JSON.stringify(w.value)} not in ${JSON.stringify(values.slice(0, 8))}`);
      if (typeof w.value === 'number' && ((o.min !== undefined && w.value < o.min) || (o.max !== undefined && w.value > o.max)))
        problems["widget value"].push(`${label(n)}.${w.name} = ${w.value} outside [${o.min}, ${o.max}]`);
    }
  }
  // node boxes, title bar included, in graph units
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  const box = n => n.flags && n.flags.collapsed ? null : [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const a = box(nodes[i]), b = box(nodes[j]);
    if (a && b && a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
      problems["overlapping nodes"].push(`${label(nodes[i])} [${a.map(Math.round)}] and ${label(nodes[j])} [${b.map(Math.round)}]`);
  }
  // in view when the workflow opens: inside the window, right of the side bar, below the top bars
  const ds = app.canvas.ds;
  const edge = (sel, side) => Math.max(0, ...Array.from(document.querySelectorAll(sel))
      .map(e => e.getBoundingClientRect()).filter(r => r.width > 0).map(r => r[side]));
  const area = [edge('.side-toolbar-container', 'right'), edge('.workflow-tabs-container, .subgraph-breadcrumb', 'bottom'),
                window.innerWidth, window.innerHeight];
  for (const n of nodes) {
    const b = box(n); if (!b) continue;
    const s = [(b[0] + ds.offset[0]) * ds.scale, (b[1] + ds.offset[1]) * ds.scale,
               (b[2] + ds.offset[0]) * ds.scale, (b[3] + ds.offset[1]) * ds.scale];
    if (s[0] < area[0] || s[1] < area[1] || s[2] > area[2] || s[3] > area[3])
      problems["node out of view"].push(`${label(n)} at [${s.map(Math.round)}], view [${area.map(Math.round)}]`);
  }
  const visible = sel => Array.from(document.querySelectorAll(sel)).filter(e => e.getBoundingClientRect().width > 0);
  for (const d of visible('.p-dialog, [role=dialog], [role=alertdialog]'))
    problems["dialog"].push(d.innerText.replace(/\s+/g, ' ').slice(0, 300));
  for (const t of visible('.p-toast-message'))
    problems["toast"].push(t.innerText.replace(/\s+/g, ' ').slice(0, 300));
  return problems;
})()"""


async def _open_app(browser, url):
    page = await browser.new_page(1600, 1000)
    await page.navigate(url + "/")
    # app.canvas before app.graph: newer front ends log an error when the graph is read before it exists
    await page.wait_for("!!(window.app && window.LiteGraph && app.canvas && app.canvas.graph && app.canvas.graph.nodes.length > 0"
                        " && LiteGraph.registered_node_types['InDomainKSampler'])", timeout=90)
    return page


@pytest.fixture(scope="session")
def front_end(chromium, comfy_server, tmp_path_factory):
    loop = asyncio.new_event_loop()
    browser = loop.run_until_complete(Browser.launch(chromium, str(tmp_path_factory.mktemp("chromium-profile"))))
    try:
        page = loop.run_until_complete(_open_app(browser, comfy_server.url))
        front = FrontEnd(loop, page, comfy_server)
        front.evaluate(SETTLE_JS)
        front.startup_errors = page.console_errors()
        front.screenshot("_startup")
        yield front
    finally:
        loop.run_until_complete(browser.close())
        loop.close()


def _workflow(name: str) -> dict:
    with open(WORKFLOWS[name]) as f:
        return json.load(f)


def test_the_front_end_starts_without_errors(front_end):
    version = front_end.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
    assert version, "not ComfyUI's front end"
    unexpected = [e for e in front_end.startup_errors if not host_noise(e)]
    assert unexpected == []
    assert front_end.evaluate(CHECK_JS)["dialog"] == []


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_loads_cleanly_in_the_front_end(front_end, name):
    problems = front_end.load(_workflow(name), name)
    front_end.screenshot(name)
    assert problems == []
    # every node of the file is on the canvas, as the type the file names
    types = front_end.evaluate("app.graph.nodes.map(n => [String(n.id), n.type])")  # ids: numbers, or strings (1.49)
    assert sorted(map(tuple, types)) == sorted((str(n["id"]), n["type"]) for n in _workflow(name)["nodes"])


def test_a_workflow_runs_from_the_front_end(front_end, comfy_server):
    workflow = _workflow(RUN_WORKFLOW)
    assert front_end.load(workflow, RUN_WORKFLOW) == []
    # shrink as a user would edit it: few steps, a small image (the graph is unchanged)
    front_end.evaluate("""(() => {
      for (const n of app.graph.nodes) for (const w of n.widgets || []) {
        if (w.name === 'steps') w.value = 2;
        if ((w.name === 'width' || w.name === 'height') && n.type === 'EmptyLatentImage') w.value = 64;
      }
      app.graph.setDirtyCanvas(true, true);
    })()""")
    front_end.page.console.clear()
    before = set(comfy_server.get("/history"))
    front_end.evaluate("app.queuePrompt(0, 1)")
    entry = comfy_server.wait_for_history(exclude=before, timeout=180)
    assert entry["status"]["status_str"] == "success", entry["status"]
    save_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "SaveImage")
    images = entry["outputs"][str(save_id)]["images"]
    path = os.path.join(comfy_server.base, "output", images[0].get("subfolder", ""), images[0]["filename"])
    assert Image.open(path).size == (64, 64)
    # the page shows it in the Save Image node
    front_end.wait_for(f"""(() => {{ const n = app.graph.getNodeById({save_id});
        return !!(n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth === 64); }})()""", timeout=30)
    front_end.evaluate(SETTLE_JS)
    front_end.screenshot(f"{RUN_WORKFLOW}.run")
    report = front_end.evaluate(CHECK_JS)
    assert report["dialog"] == [] and report["node flagged with errors"] == []
    assert [e for e in front_end.page.console_errors() if not host_noise(e)] == []


def _broken(kind: str) -> dict:
    workflow = copy.deepcopy(_workflow(RUN_WORKFLOW))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "InDomainKSampler")
    if kind == "unknown node type":
        sampler["type"] = "InDomainNoSuchNode"
    elif kind == "unknown model file":
        loader = next(n for n in workflow["nodes"] if n["type"] == "InDomainUNetLoader")
        loader["widgets_values"][0] = "no_such_domain.safetensors"
    elif kind == "overlapping nodes":
        decode = next(n for n in workflow["nodes"] if n["type"] == "VAEDecode")
        decode["pos"] = [sampler["pos"][0] + 40, sampler["pos"][1] + 40]
    return workflow


@pytest.mark.parametrize("kind, expected", [
    pytest.param("unknown node type", "missing node type: InDomainNoSuchNode", id="unknown-node-type"),
    pytest.param("unknown model file", "widget value: InDomainUNetLoader", id="unknown-model-file"),
    pytest.param("overlapping nodes", "overlapping nodes: ", id="overlapping-nodes"),
])
def test_the_checks_fail_on_a_broken_workflow(front_end, kind, expected):
    problems = front_end.load(_broken(kind), f"broken-{kind.replace(' ', '-')}")
    front_end.screenshot(f"_broken-{kind.replace(' ', '-')}")
    assert any(p.startswith(expected) for p in problems), problems
    if kind == "unknown node type":  # the front end tells the user, too: a dialog (1.35) or a notice panel (1.49)
        told = any(p.startswith("dialog: ") and "InDomainNoSuchNode" in p for p in problems)
        assert told or front_end.evaluate("document.body.innerText.includes('InDomainNoSuchNode')"), problems


# --- help pages and templates, as the page asks for them -----------------------------------------

HELP_JS = """(async () => {
  // the front end's NodeHelpService for a custom node: /extensions/<pack>/docs/<node id>.md, the pack
  // being the folder in the node definition's python_module ("custom_nodes.<folder>")
  const out = {};
  for (const [name, type] of Object.entries(LiteGraph.registered_node_types)) {
    if (!name.startsWith('InDomain')) continue;
    const pack = type.nodeData.python_module.split('.')[1].split('@')[0];
    const response = await fetch(`extensions/${pack}/docs/${name}.md`);
    out[name] = [response.status, await response.text()];
  }
  return out;
})()"""

PANEL_JS = """(async (name, expected) => {
  // the node library's info panel, opened as its (i) button does: the node library tab, then the
  // help store's openHelp(node definition); the panel fetches and renders the page itself
  const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
  if (!stores.get('nodeHelp')) return null;  // front end 1.49: no help store until its side panel makes one
  const wait = async (shown) => {
    for (let i = 0; i < 100 && document.body.innerText.includes(expected) !== shown; i++) await new Promise(r => setTimeout(r, 100));
    return document.body.innerText.includes(expected) === shown;
  };
  stores.get('nodeHelp').closeHelp();  // the previous node's page gone first
  if (!await wait(false)) return false;
  stores.get('sidebarTab').activeSidebarTabId = 'node-library';
  stores.get('nodeHelp').openHelp(stores.get('nodeDef').nodeDefsByName[name]);
  return await wait(true);
})"""

CLOSE_PANEL_JS = """(() => {
  const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
  if (stores.get('nodeHelp')) stores.get('nodeHelp').closeHelp();
  stores.get('sidebarTab').activeSidebarTabId = null;
})()"""

TEMPLATES_JS = """(async () => {
  // what the Templates dialog reads: the custom nodes' templates by folder, each <name>.jpg beside it
  const listed = await (await fetch('api/workflow_templates')).json();
  const thumbnails = {};
  for (const [pack, names] of Object.entries(listed)) for (const name of names) {
    const image = new Image();
    image.src = `api/workflow_templates/${pack}/${name}.jpg`;
    try { await image.decode(); thumbnails[`${pack}/${name}`] = [image.naturalWidth, image.naturalHeight]; }
    catch (e) { thumbnails[`${pack}/${name}`] = null; }
  }
  return {listed, thumbnails};
})()"""


def test_each_nodes_help_page_is_served_to_the_page(front_end):
    pages = front_end.evaluate(HELP_JS)
    assert set(pages) == live_server.pack_node_ids(live_server.REPO)
    for name, (status, text) in pages.items():
        assert status == 200 and text.startswith("# ") and "n + cfg · (c − n)" in text, (name, status, text[:80])


def test_each_nodes_help_page_shows_in_the_node_librarys_info_panel(front_end):
    """The rendered page (its formula), not the node's description (the panel's fallback when the page
    is missing)."""
    try:
        for name in sorted(live_server.pack_node_ids(live_server.REPO)):
            shown = front_end.evaluate(f"{PANEL_JS}({json.dumps(name)}, 'Σₖ wₖ · (dₖ − u)')")
            if shown is None:
                pytest.skip("this front end (1.49) has no node-help store to open the panel with; "
                            "test_each_nodes_help_page_is_served_to_the_page fetches the pages as its panel does")
            front_end.screenshot(f"_help-{name}")
            assert shown, f"{name}: the info panel does not show its help page"
    finally:
        front_end.evaluate(CLOSE_PANEL_JS)


def test_the_templates_dialog_finds_the_packs_templates_and_thumbnails(front_end):
    found = front_end.evaluate(TEMPLATES_JS)
    assert sorted(found["listed"][live_server.PACK_NAME]) == sorted(WORKFLOWS)
    for name in WORKFLOWS:
        assert found["thumbnails"][f"{live_server.PACK_NAME}/{name}"] == [400, 300], name
