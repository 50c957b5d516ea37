"""Writes example_workflows/<name>.jpg: a small picture of each template's graph, for the host's
Templates dialog (which shows `<name>.jpg` beside each custom-node template).

The picture is drawn from the workflow file alone (node boxes at their positions, links coloured by
type, the node titles, the template's name on top), so it is the same on every run:
    python tools/make_thumbnails.py          (any Python with Pillow, e.g. the host's .venv)
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys

from PIL import Image, ImageDraw, ImageFont

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(REPO, "example_workflows")
SIZE = (400, 300)
QUALITY = 80
BACKGROUND, NODE, TITLE_BAR, TEXT, OURS = (32, 32, 36), (53, 53, 58), (70, 70, 78), (230, 230, 230), (46, 110, 140)
LINK_COLOURS = {"MODEL": (180, 160, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110), "CONDITIONING": (255, 170, 80),
                "LATENT": (255, 150, 200), "IMAGE": (100, 180, 255), "CONTROL_NET": (0, 200, 150),
                "GUIDER": (110, 200, 230), "SIGMAS": (200, 200, 120), "NOISE": (170, 170, 170), "SAMPLER": (200, 140, 230)}
TITLES = {"CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode", "EmptyLatentImage": "Empty Latent",
          "InDomainKSampler": "KSampler (Domain)", "InDomainUNetLoader": "Load Domain UNet", "InDomainTrainUNet": "Train Domain UNet",
          "InDomainGuider": "Domain Guider", "InDomainTerm": "Domain Term", "VAEDecode": "VAE Decode", "VAEEncode": "VAE Encode",
          "SaveImage": "Save Image", "PreviewImage": "Preview Image", "LoadImage": "Load Image",
          "ControlNetLoader": "Load ControlNet", "ControlNetApplyAdvanced": "Apply ControlNet",
          "UNETLoader": "Diffusion Model", "DualCLIPLoader": "DualCLIPLoader", "VAELoader": "Load VAE",
          "EmptySD3LatentImage": "Empty SD3 Latent", "FluxGuidance": "FluxGuidance", "ConditioningZeroOut": "Zero Out",
          "CLIPLoader": "Load CLIP", "ModelSamplingAuraFlow": "Shift (AuraFlow)", "ModelSamplingSD3": "Shift (SD3)",
          "TextEncodeQwenImageEdit": "Qwen Edit Encode", "EmptyFlux2LatentImage": "Empty Flux.2 Latent",
          "Flux2Scheduler": "Flux2Scheduler", "RandomNoise": "RandomNoise", "DisableNoise": "DisableNoise",
          "KSamplerSelect": "KSamplerSelect", "BasicScheduler": "BasicScheduler", "SplitSigmas": "SplitSigmas",
          "SamplerCustomAdvanced": "SamplerCustomAdv.", "EmptyHunyuanLatentVideo": "Empty Video Latent",
          "SaveWEBM": "Save WEBM"}
log = logging.getLogger("indomain.thumbnails")


def layout(workflow: dict) -> tuple[float, float, float]:
    """(scale, x offset, y offset) that fit every node into the picture below the heading."""
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in workflow["nodes"]]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    width, height = max(b[2] for b in boxes) - left, max(b[3] for b in boxes) - top
    margin, heading = 10, 34
    scale = min((SIZE[0] - 2 * margin) / width, (SIZE[1] - heading - margin) / height)
    return scale, margin - left * scale, heading - top * scale


def render(workflow: dict, name: str) -> Image.Image:
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    scale, dx, dy = layout(workflow)
    at = lambda x, y: (x * scale + dx, y * scale + dy)  # noqa: E731
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for _, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 10 + 20 * src_slot)
        end = at(b["pos"][0], b["pos"][1] + 10 + 20 * dst_slot)
        draw.line([start, end], fill=LINK_COLOURS.get(kind, (160, 160, 160)), width=2)
    font = ImageFont.load_default(size=max(8, round(13 * scale / 0.45)) if scale < 0.45 else 13)
    for node in workflow["nodes"]:
        x0, y0 = at(node["pos"][0], node["pos"][1] - 26)
        x1, y1 = at(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        ours = node["type"].startswith("InDomain")
        draw.rounded_rectangle([x0, y0, x1, y1], radius=4, fill=NODE, outline=OURS if ours else TITLE_BAR, width=2)
        draw.rectangle([x0 + 2, y0 + 2, x1 - 2, y0 + 26 * scale], fill=OURS if ours else TITLE_BAR)
        draw.text((x0 + 4, y0 + 3), TITLES.get(node["type"], node["type"]), fill=TEXT, font=font)
    draw.text((10, 8), name.replace("_", " "), fill=TEXT, font=ImageFont.load_default(size=18))
    return image


def thumbnail_path(workflow_path: str) -> str:
    return os.path.splitext(workflow_path)[0] + ".jpg"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in sorted(glob.glob(os.path.join(FOLDER, "*.json"))):
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        out = thumbnail_path(path)
        render(workflow, name).save(out, "JPEG", quality=QUALITY, optimize=True)
        log.info("%s: %d bytes", os.path.relpath(out, REPO), os.path.getsize(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
