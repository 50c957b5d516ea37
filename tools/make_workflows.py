"""Writes example_workflows/*.json (ComfyUI UI format) from the compact graphs below.

Run inside a started host (it reads the real node definitions for sockets and widget order):
    COMFYUI_PATH=... python -m tools.make_workflows   (from the repository's root)
then draw their thumbnails for the Templates dialog: python tools/make_thumbnails.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.support import host  # noqa: E402
from tests.support.workflow_api import input_defs, widget_inputs  # noqa: E402

CKPT = "v1-5-pruned-emaonly.safetensors"
DOMAIN = "my_domain.safetensors"
NEG = "blurry, low quality, watermark"

# Each node: id -> (type, {widget: value}, {input: (node, slot)}, column). Columns are laid out
# left to right in the order of their numbers (unused numbers leave no gap); in a column the
# nodes are stacked in the order of their ids.
LAST = 9  # the output column: decode, then save
COMMON = {
    1: ("CheckpointLoaderSimple", {"ckpt_name": CKPT}, {}, 0),
    2: ("InDomainUNetLoader", {"unet_name": DOMAIN, "lora_strength": 1.0}, {"base_model": (1, 0)}, 1),
    4: ("CLIPTextEncode", {"text": NEG}, {"clip": (1, 1)}, 1),
    5: ("CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, 1),
    9: ("VAEDecode", {}, {"samples": (7, 0), "vae": (1, 2)}, LAST),
    10: ("SaveImage", {"filename_prefix": "indomain"}, {"images": (9, 0)}, LAST),
}


def sampler(positive=(3, 0), negative=(4, 0), latent=(6, 0), cfg=7.0, scale=1.5, denoise=1.0, column=2):
    return ("InDomainKSampler", {"seed": 42, "steps": 25, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                                 "denoise": denoise, "domain_scale": scale, "domain_start": 0.0, "domain_end": 1.0,
                                 "control_in_domain": False},
            {"model": (1, 0), "positive": positive, "negative": negative, "null_conditioning": (5, 0),
             "latent_image": latent, "domain_model": (2, 0)}, column)


EMPTY = ("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, {}, 1)

# --- SDXL and Flux.1 dev: what a user of each family builds with the host's stock loaders ----------
# SDXL: one checkpoint (Load Checkpoint), 1024x1024, KSampler's usual 25 Euler steps at cfg 7; a domain
# LoRA trained at 1024 (the family's resolution).
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL = {
    **COMMON,
    1: ("CheckpointLoaderSimple", {"ckpt_name": SDXL_CKPT}, {}, 0),
    2: ("InDomainUNetLoader", {"unet_name": "my_sdxl_domain.safetensors", "lora_strength": 1.0}, {"base_model": (1, 0)}, 1),
    6: ("EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, 1),
}
SDXL_TRAIN = {"mode": "lora", "steps": 1000, "batch_size": 2, "learning_rate": 1e-4, "resolution": 1024,
              "gradient_checkpointing": True, "save_name": "my_sdxl_domain", "image_folder": "my_domain_images",
              "checkpoint_every": 250, "preview_every": 250}

# Flux.1 dev as the host's own Flux templates build it: Load Diffusion Model (flux1-dev), DualCLIPLoader
# (CLIP-L and T5-XXL, type flux), the Flux VAE (ae), an empty SD3 latent (16 channels) of 1024x1024,
# FluxGuidance 3.5 on the prompt and KSampler at cfg 1 (the negative, ConditioningZeroOut, is then not
# computed), 20 Euler steps, scheduler simple. The domain term is measured at the prompt's guidance.
FLUX = {
    1: ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}, {}, 0),
    15: ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}, {}, 0),
    16: ("VAELoader", {"vae_name": "ae.safetensors"}, {}, 0),
    5: ("CLIPTextEncode", {"text": ""}, {"clip": (15, 0)}, 1),
    6: ("EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, {}, 1),
    9: ("VAEDecode", {}, {"samples": (7, 0), "vae": (16, 0)}, LAST),
    10: COMMON[10],
}
FLUX_SAMPLER = {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "domain_scale": 1.0, "domain_start": 0.0, "domain_end": 1.0, "control_in_domain": False}


def flux_prompt(text, column):
    """The prompt (3), its FluxGuidance (14) and the zeroed negative (17), as the host's Flux templates have them."""
    return {3: ("CLIPTextEncode", {"text": text}, {"clip": (15, 0)}, 1),
            14: ("FluxGuidance", {"guidance": 3.5}, {"conditioning": (3, 0)}, column),
            17: ("ConditioningZeroOut", {}, {"conditioning": (3, 0)}, column)}


def flux_sampler(domain, column):
    return ("InDomainKSampler", FLUX_SAMPLER,
            {"model": (1, 0), "positive": (14, 0), "negative": (17, 0), "null_conditioning": (5, 0),
             "latent_image": (6, 0), "domain_model": domain}, column)


FLUX_TRAIN = {"mode": "lora", "steps": 1000, "batch_size": 1, "learning_rate": 1e-4, "resolution": 1024,
              "gradient_checkpointing": True, "save_name": "my_flux_domain", "image_folder": "my_domain_images",
              "checkpoint_every": 250, "preview_every": 250}

NOTE = "Note"  # a text node of the front end (not a host node): what the template needs and why it is set so


def note(text, column=0):
    return (NOTE, {"title": "Read me", "text": text.strip()}, {}, column)


SDXL_NOTE = note("""
SDXL with a domain.

Files: sd_xl_base_1.0.safetensors in models/checkpoints; the domain (a LoRA of this base, e.g. from the sdxl_train_domain template: models/loras/my_sdxl_domain.safetensors) in Load Domain UNet.

1024 x 1024 is SDXL's resolution. cfg steers towards the prompt with the base model only; domain_scale (about 1 to 2) adds w * (domain - base) on the empty prompt; 0 is KSampler bit for bit.
""")
SDXL_TRAIN_NOTE = note("""
Train an SDXL domain, then sample with it.

Put the domain images (no captions) in ComfyUI/input/my_domain_images. Train Domain UNet learns a LoRA of the base at 1024 px (gradient checkpointing, bf16) and writes models/loras/my_sdxl_domain.safetensors every 250 steps; queued again, it resumes from there (or, with the same images and settings, the host reuses its result). Load Domain UNet reads the file later.

File: sd_xl_base_1.0.safetensors in models/checkpoints.
""")
FLUX_NOTE = note("""
Flux.1 dev with a domain.

Files: flux1-dev.safetensors in models/diffusion_models; clip_l.safetensors and t5xxl_fp16.safetensors in models/text_encoders; ae.safetensors in models/vae; the domain (a LoRA of flux1-dev, e.g. from the flux_dev_train_domain template: models/loras/my_flux_domain.safetensors) in Load Domain UNet.

cfg 1, as Flux dev is run: FluxGuidance on the prompt steers it and the negative is not computed. domain_scale adds w * (domain - base) on the empty prompt, both at the prompt's guidance; 0 is KSampler bit for bit.
""")
FLUX_TRAIN_NOTE = note("""
Train a Flux.1 dev domain, then sample with it.

Put the domain images (no captions) in ComfyUI/input/my_domain_images. Train Domain UNet learns a LoRA of flux1-dev at 1024 px (gradient checkpointing, bf16) on the empty prompt at guidance 3.5 (the host's default) and writes models/loras/my_flux_domain.safetensors every 250 steps; queued again, it resumes from there.

Files: flux1-dev.safetensors in models/diffusion_models; clip_l.safetensors and t5xxl_fp16.safetensors in models/text_encoders; ae.safetensors in models/vae.
""")

FAMILY_GRAPHS = {
    "sdxl_text_to_image_domain": {
        **SDXL, 3: ("CLIPTextEncode", {"text": "a cat sitting on a windowsill, in the domain's style"}, {"clip": (1, 1)}, 1),
        7: sampler(), 30: SDXL_NOTE},
    "sdxl_train_domain": {
        **{k: SDXL[k] for k in (1, 4, 5, 6, 9, 10)},
        3: ("CLIPTextEncode", {"text": "a teapot on a wooden table, in the domain's style"}, {"clip": (1, 1)}, 1),
        20: ("InDomainTrainUNet", SDXL_TRAIN, {"model": (1, 0), "vae": (1, 2), "null_conditioning": (5, 0)}, 2),
        21: ("PreviewImage", {}, {"images": (20, 1)}, 2),
        7: ("InDomainKSampler", sampler()[1], {**sampler()[2], "domain_model": (20, 0)}, 3), 30: SDXL_TRAIN_NOTE},
    "flux_dev_text_to_image_domain": {
        **FLUX,
        2: ("InDomainUNetLoader", {"unet_name": "my_flux_domain.safetensors", "lora_strength": 1.0}, {"base_model": (1, 0)}, 1),
        **flux_prompt("a cat sitting on a windowsill, in the domain's style", 2),
        7: flux_sampler((2, 0), 3), 30: FLUX_NOTE},
    "flux_dev_train_domain": {
        **FLUX,
        **flux_prompt("a teapot on a wooden table, in the domain's style", 1),
        20: ("InDomainTrainUNet", FLUX_TRAIN, {"model": (1, 0), "vae": (16, 0), "null_conditioning": (5, 0)}, 2),
        21: ("PreviewImage", {}, {"images": (20, 1)}, 2),
        7: flux_sampler((20, 0), 3), 30: FLUX_TRAIN_NOTE},
}


GRAPHS = {
    "text_to_image_domain": {
        **COMMON, 3: ("CLIPTextEncode", {"text": "a cat sitting on a windowsill, in the domain's style"}, {"clip": (1, 1)}, 1),
        6: EMPTY, 7: sampler()},
    "unconditional_domain": {
        **COMMON, 4: ("CLIPTextEncode", {"text": ""}, {"clip": (1, 1)}, 1),
        6: EMPTY, 7: sampler(positive=(5, 0), negative=(5, 0), cfg=0.0, scale=1.0)},
    "controlnet_domain": {
        **COMMON, 3: ("CLIPTextEncode", {"text": "a vase on a table"}, {"clip": (1, 1)}, 1),
        6: EMPTY,
        11: ("ControlNetLoader", {"control_net_name": "control_v11p_sd15_canny.safetensors"}, {}, 0),
        12: ("LoadImage", {"image": "control_hint.png"}, {}, 0),
        13: ("ControlNetApplyAdvanced", {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": (3, 0), "negative": (4, 0), "control_net": (11, 0), "image": (12, 0), "vae": (1, 2)}, 2),
        7: sampler(positive=(13, 0), negative=(13, 1), column=3)},
    "img2img_domain": {
        **COMMON, 3: ("CLIPTextEncode", {"text": "a portrait photo"}, {"clip": (1, 1)}, 1),
        12: ("LoadImage", {"image": "source.png"}, {}, 0),
        6: ("VAEEncode", {}, {"pixels": (12, 0), "vae": (1, 2)}, 1),
        7: sampler(denoise=0.6)},
    "train_domain": {
        1: COMMON[1], 4: COMMON[4], 5: COMMON[5], 9: COMMON[9], 10: COMMON[10],
        3: ("CLIPTextEncode", {"text": "a teapot on a wooden table, in the domain's style"}, {"clip": (1, 1)}, 1),
        20: ("InDomainTrainUNet", {"mode": "lora", "steps": 1000, "batch_size": 4, "learning_rate": 1e-4,
                                   "save_name": "my_domain", "image_folder": "my_domain_images", "checkpoint_every": 250,
                                   "preview_every": 250},
             {"model": (1, 0), "vae": (1, 2), "null_conditioning": (5, 0)}, 2),
        21: ("PreviewImage", {}, {"images": (20, 1)}, 2),
        6: EMPTY,
        7: ("InDomainKSampler", sampler()[1], {**sampler()[2], "domain_model": (20, 0)}, 3)},
    **FAMILY_GRAPHS,
}


# Node sizes [width, height of the body below the title]: at least what ComfyUI's front end
# (1.35) makes of each node, so that it keeps them and no node grows into the next one; the
# browser test checks that the loaded nodes do not overlap and are all in view.
SIZES = {
    "CheckpointLoaderSimple": (320, 100), "ControlNetLoader": (320, 60), "LoadImage": (320, 320),
    "InDomainUNetLoader": (340, 84), "CLIPTextEncode": (340, 140), "EmptyLatentImage": (340, 108),
    "VAEEncode": (340, 48), "ControlNetApplyAdvanced": (340, 190), "InDomainKSampler": (340, 420),
    "InDomainTrainUNet": (340, 720), "PreviewImage": (340, 300), "VAEDecode": (340, 48), "SaveImage": (340, 340),
    "UNETLoader": (320, 84), "DualCLIPLoader": (320, 130), "VAELoader": (320, 60), "EmptySD3LatentImage": (340, 108),
    "FluxGuidance": (340, 60), "ConditioningZeroOut": (340, 30), "Note": (320, 330),
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
        if kind == "CLIPTextEncode" and widgets.get("text") == "":
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
