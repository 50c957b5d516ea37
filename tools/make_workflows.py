"""Writes example_workflows/*.json (ComfyUI UI format) from the compact graphs of
tools/workflow_graphs.py: the nodes laid out in their columns, their sockets and widgets as the host
declares them.

Run inside a started host (it reads the real node definitions for sockets and widget order):
    COMFYUI_PATH=... python -m tools.make_workflows   (from the repository's root)
then draw their thumbnails for the Templates dialog: python tools/make_thumbnails.py
"""
from __future__ import annotations

import json
import os
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.support import host  # noqa: E402
from tests.support.workflow_api import input_defs, widget_inputs  # noqa: E402
from tools.workflow_graphs import GRAPHS, NOTE  # noqa: E402

# Node sizes [width, height of the body below the title]: at least what ComfyUI's front end
# (1.35) makes of each node, so that it keeps them and no node grows into the next one; the
# browser test checks that the loaded nodes do not overlap and are all in view.
SIZES = {
    "CheckpointLoaderSimple": (320, 100), "ControlNetLoader": (320, 60), "LoadImage": (320, 320),
    "InDomainUNetLoader": (340, 84), "CLIPTextEncode": (340, 140), "EmptyLatentImage": (340, 108),
    "VAEEncode": (340, 48), "ControlNetApplyAdvanced": (340, 190), "InDomainKSampler": (340, 420),
    "InDomainTrainUNet": (340, 940), "PreviewImage": (340, 300), "VAEDecode": (340, 48), "SaveImage": (340, 340),
    "UNETLoader": (320, 84), "DualCLIPLoader": (320, 130), "VAELoader": (320, 60), "EmptySD3LatentImage": (340, 108),
    "FluxGuidance": (340, 60), "ConditioningZeroOut": (340, 30), "Note": (320, 330),
    "CLIPLoader": (320, 108), "ModelSamplingAuraFlow": (340, 60), "ModelSamplingSD3": (340, 60),
    "TextEncodeQwenImageEdit": (420, 160), "EmptyFlux2LatentImage": (340, 108), "Flux2Scheduler": (340, 108),
    "RandomNoise": (340, 84), "DisableNoise": (340, 30), "KSamplerSelect": (340, 60), "BasicScheduler": (340, 108),
    "SplitSigmas": (340, 80), "InDomainGuider": (340, 280), "SamplerCustomAdvanced": (340, 108),
    "EmptyHunyuanLatentVideo": (340, 132), "SaveWEBM": (340, 340),
}
TITLE, GAP_X, GAP_Y = 30, 50, 30
# The view a workflow opens with: the whole graph in a 1600x1000 window, clear of the front
# end's side bar (60 px) and top bar (95 px).
WINDOW, CHROME_LEFT, CHROME_TOP, MARGIN = (1600, 1000), 60, 95, 20


def layout(graph: dict) -> dict[int, tuple[list[int], list[int]]]:
    """pos and size of every node: columns left to right, nodes stacked top to bottom."""
    columns = sorted({col for *_, col in graph.values()})
    placed, x = {}, 40
    for col in columns:
        ids = sorted(nid for nid, spec in graph.items() if spec[3] == col)
        width = max(SIZES[graph[nid][0]][0] for nid in ids)
        y = 40 + TITLE
        for nid in ids:
            height = SIZES[graph[nid][0]][1]
            placed[nid] = ([x, y], [width, height])
            y += height + TITLE + GAP_Y
        x += width + GAP_X
    return placed


def view(placed) -> dict:
    left = min(p[0] for p, _ in placed.values())
    top = min(p[1] for p, _ in placed.values()) - TITLE
    right = max(p[0] + s[0] for p, s in placed.values())
    bottom = max(p[1] + s[1] for p, s in placed.values())
    scale = min(1.0, (WINDOW[0] - CHROME_LEFT - 2 * MARGIN) / (right - left),
                (WINDOW[1] - CHROME_TOP - 2 * MARGIN) / (bottom - top))
    scale = int(scale * 100) / 100
    # screen = (graph + offset) * scale
    offset = [round((CHROME_LEFT + MARGIN) / scale - left, 1), round((CHROME_TOP + MARGIN) / scale - top, 1)]
    return {"scale": scale, "offset": offset}


def build(graph: dict, registry: dict) -> dict:
    nodes, links = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    placed = layout(graph)
    for nid, (kind, widgets, inputs, col) in sorted(graph.items(), key=lambda kv: (kv[1][3], kv[0])):
        if kind == NOTE:  # the front end's own text node: no inputs or outputs, never queued
            pos, size = placed[nid]
            nodes.append({"id": nid, "type": NOTE, "pos": pos, "size": size, "flags": {}, "order": 0, "mode": 0,
                          "inputs": [], "outputs": [], "title": widgets["title"], "properties": {"text": ""},
                          "widgets_values": [widgets["text"]]})
            continue
        cls = registry[kind]
        node_inputs = []
        for name, typ, _ in input_defs(cls):
            if name in inputs:
                src, slot = inputs[name]
                link_id = len(links) + 1
                links.append([link_id, src, slot, nid, len(node_inputs), graph[src][0] and _out_type(registry[graph[src][0]], slot)])
                out_links.setdefault((src, slot), []).append(link_id)
                node_inputs.append({"name": name, "type": typ, "link": link_id})
            elif typ not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                node_inputs.append({"name": name, "type": typ, "link": None})
        values = []
        for name, extra in widget_inputs(cls):
            if name in widgets:
                values.append(widgets[name])
            else:
                values.append(_default(cls, name))
            if extra:
                values.extend(["fixed"] if name in ("seed", "noise_seed") else ["image"])
        pos, size = placed[nid]
        nodes.append({"id": nid, "type": kind, "pos": pos, "size": size,
                      "flags": {}, "order": 0, "mode": 0, "inputs": node_inputs, "outputs": [],
                      "properties": {"Node name for S&R": kind}, "widgets_values": values})
        if "_title" in widgets:  # (not a widget: the node's title)
            nodes[-1]["title"] = widgets["_title"]
        elif kind == "CLIPTextEncode" and widgets.get("text") == "":
            nodes[-1]["title"] = "Empty prompt (null_conditioning)"
    for node in nodes:
        if node["type"] == NOTE:
            continue
        cls = registry[node["type"]]
        node["outputs"] = [{"name": name, "type": typ, "links": out_links.get((node["id"], i), []), "slot_index": i}
                           for i, (name, typ) in enumerate(zip(_out_names(cls), cls.RETURN_TYPES))]
    _set_order(nodes, links)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": view(placed)}, "version": 0.4}


def _out_type(cls, slot):
    return cls.RETURN_TYPES[slot]


def _out_names(cls):
    names = getattr(cls, "RETURN_NAMES", None)
    return list(names) if names else list(cls.RETURN_TYPES)


def _default(cls, name):
    for n, kind, opts in input_defs(cls):
        if n == name:
            if "default" in opts:
                return opts["default"]
            spec = cls.INPUT_TYPES()
            combo = {**spec.get("required", {}), **spec.get("optional", {})}[name][0]
            return combo[0] if isinstance(combo, list) and combo else None
    return None


def _set_order(nodes, links):
    deps = {n["id"]: {l[1] for l in links if l[3] == n["id"]} for n in nodes}
    done, order = set(), 0
    while len(done) < len(nodes):
        for n in nodes:
            if n["id"] not in done and deps[n["id"]] <= done:
                n["order"] = order
                order += 1
                done.add(n["id"])


def main():
    h = host.Host(host.find_host(), tempfile.mkdtemp()).start()
    out_dir = os.path.join(REPO, "example_workflows")
    os.makedirs(out_dir, exist_ok=True)
    for name, graph in GRAPHS.items():
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(build(graph, h.nodes), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
