"""UI-format workflows (what a user drags into ComfyUI) to API-format prompts (what the front end queues).

Widget values are matched to widget inputs in the order of the node's INPUT_TYPES, as the
front end does: a seed with control_after_generate and an image_upload combo each carry one
extra value in widgets_values.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONT_END_ONLY = {"Note", "MarkdownNote"}  # the front end's text nodes: not part of the prompt it queues


def input_defs(node_class) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input of a node class, required then optional."""
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0] if isinstance(value[0], str) else "COMBO"
            options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
            out.append((name, kind, options))
    return out


def widget_inputs(node_class) -> list[tuple[str, int]]:
    """(name, extra values after it) for each widget input, in widgets_values order."""
    widgets = []
    for name, kind, options in input_defs(node_class):
        if kind in WIDGET_TYPES and not options.get("forceInput"):
            extra = int(bool(options.get("control_after_generate"))) + int(bool(options.get("image_upload")))
            widgets.append((name, extra))
    return widgets


def to_api(workflow: dict, registry: dict) -> dict:
    """The API prompt of a UI workflow (muted and bypassed nodes and notes are left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in FRONT_END_ONLY:
            continue
        cls = registry[node["type"]]
        inputs = {}
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        pos = 0
        for name, extra in widget_inputs(cls):
            if pos >= len(values):
                break
            if name not in linked:
                inputs[name] = values[pos]
            pos += 1 + extra
        for name, link_id in linked.items():
            _, origin, slot, *_ = links[link_id]
            inputs[name] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
