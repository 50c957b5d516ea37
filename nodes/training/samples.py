"""Validation samples of Train Domain UNet: at each checkpoint, the user's prompts sampled with the
domain being trained, one grid per checkpoint, so that "which checkpoint?" can be answered by
looking (beside the validation loss of training/validation.py).

What each image is: what Load Domain UNet + KSampler (Domain Guidance) give with the checkpoint's
file. The base MODEL the node trains; as domain_model the checkpoint's weights made into the MODEL
the node outputs (run.trained_model: a LoRA applied to the base, or a full copy); positive the
prompt encoded as CLIP Text Encode encodes it (the node's clip); negative and null_conditioning
the empty prompt (the node's null_conditioning, else "" encoded with clip); one seed for every
image; `steps` steps of euler, scheduler "normal" for the discrete families (SD1.x, SD2.x, SDXL)
and "simple" for rectified flow, as their templates sample them; cfg the family's usual
(families.py: 7 for SD1.x/SDXL, 1 for the guidance-distilled Flux.1 and Flux.2 ...) unless set;
an empty latent of resolution x resolution; decoded as VAE Decode decodes, written as Save Image
writes. A row per prompt, a column per domain_scale (default 0, 1, 2: 0 is the base alone,
KSampler exactly; the others the domain's pull at the weights users try). The images of
domain_scale 0 do not depend on the weights: they are sampled once per run.

Where: output/indomain_previews/<save name>/validation_step_NNNNNN.png, beside the previews,
written atomically with the settings in its PNG text ("indomain.validation"); the node's
validation_samples output (the last grid) and its progress preview; TensorBoard's
validation/samples where the run logs to TensorBoard.

When: at every checkpoint (checkpoint_every) and at the end (the loop's on_samples). A resumed
run first makes the grid of the checkpoint it resumes from where that grid is missing or was made
of other weights or settings (a run stopped while sampling it, prompts changed since).

What the host is left with: the sampling runs in the host's inference mode, with the training's
changes to the host undone for it (the loop suspends the LoRA adapters; run.py the host's training
ops), and the global random state restored after it; the domain MODEL is then unloaded, the CUDA
graphs its sampling captured are let go (cudagraph.OWNER), and the base is left as a preview
leaves it (full mode: unloaded; LoRA: loaded for training again). Cancel stops it at the next
sampling step (the host's interrupt is checked at each).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import comfy.model_management
import folder_paths

from ...cudagraph import OWNER
from ...training.checkpoint import atomic_write, tensors_fingerprint
from ..dynamic_vram import release
from ..sampling.run import collect_terms, make_guider, sample_like_ksampler
from ..sampling.conditioning import check_text_width
from .differentiable import load_for_training
from .inputs import HostModel

log = logging.getLogger(__name__)

SAMPLER = "euler"
DEFAULT_SCALES = "0, 1, 2"
DEFAULT_STEPS = 20
PREFIX = "validation_step_"
METADATA_KEY = "indomain.validation"
TENSORBOARD_TAG = "validation/samples"


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """The node's validation inputs, read (validation_settings)."""
    prompts: tuple[str, ...]  # none: no validation samples
    scales: tuple[float, ...]  # the domain_scale of each column
    seed: int
    steps: int
    cfg: float  # 0: the family's usual

    @property
    def on(self) -> bool:
        return bool(self.prompts)


def validation_settings(prompts: str = "", scales: str = DEFAULT_SCALES, seed: int = 0, steps: int = DEFAULT_STEPS,
                        cfg: float = 0.0) -> ValidationSettings:
    """The node's inputs read: one prompt per non-empty line (surrounding spaces dropped), the
    domain_scale values separated by commas or spaces. ValueError naming the input otherwise."""
    lines = tuple(line.strip() for line in (prompts or "").splitlines())
    values = [v for v in re.split(r"[,;\s]+", (scales or "").strip()) if v]
    parsed = []
    for v in values:
        try:
            parsed.append(float(v))
        except ValueError:
            parsed.append(None)
        if parsed[-1] is None or not math.isfinite(parsed[-1]) or not -10.0 <= parsed[-1] <= 50.0:
            raise ValueError(f"validation_domain_scales: {v!r} is not a domain_scale (a number from -10 to 50); give "
                             f"the values separated by commas, e.g. {DEFAULT_SCALES!r}")
    settings = ValidationSettings(tuple(line for line in lines if line), tuple(parsed), int(seed), int(steps), float(cfg))
    if settings.on and not settings.scales:
        raise ValueError(f"validation_domain_scales is empty; give the domain_scale of each column, e.g. {DEFAULT_SCALES!r}")
    if settings.on and (settings.steps < 1 or settings.cfg < 0 or not math.isfinite(settings.cfg)):
        raise ValueError(f"validation_steps={settings.steps}, validation_cfg={settings.cfg}: expected at least one step "
                         "and a cfg >= 0 (0: the family's usual)")
    return settings


def grid_path(folder: str, step: int) -> str:
    return os.path.join(folder, f"{PREFIX}{step:06d}.png")


class ValidationSamples:
    """The loop's on_samples: (step, the checkpoint's weights, resumed) -> the grid of that step
    written (module docstring); `latest` holds the last grid as an IMAGE [1, H, W, 3]. Made before
    the run (the prompts encoded: a bad input refused before anything is written); start() hands
    it what the run makes."""

    def __init__(self, *, model, host: HostModel, vae, clip, null, settings: ValidationSettings, mode: str,
                 resolution: int, total_steps: int, folder: str, make_domain: Callable[[dict], object]):
        if clip is None:
            raise ValueError("validation_prompts: connect clip (the base checkpoint's CLIP) to encode them with, or "
                             "leave validation_prompts empty")
        self.model, self.trainer, self.host, self.vae, self.mode = model, model, host, vae, mode
        self.settings, self.total_steps, self.folder, self.make_domain = settings, total_steps, folder, make_domain
        self.bar, self.say, self.board = None, lambda text: None, None
        self.null = null
        check_text_width(model, null, "null_conditioning")
        self.positives = []
        for prompt in settings.prompts:  # as CLIP Text Encode encodes it
            positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
            check_text_width(model, positive, "validation_prompts (encoded with clip)")
            self.positives.append(positive)
        self.cfg = settings.cfg or host.family.cfg
        self.scheduler = "simple" if host.prediction_type == "flow" else "normal"
        ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else getattr(vae, "downscale_ratio", 8)
        self.side = resolution // ratio  # (a video VAE's downscale_ratio is per axis: the method gives the spatial one)
        self.record = {"prompts": list(settings.prompts), "domain_scales": list(settings.scales), "seed": settings.seed,
                       "steps": settings.steps, "cfg": self.cfg, "sampler": SAMPLER, "scheduler": self.scheduler,
                       "resolution": resolution}
        self.fixed: dict[int, np.ndarray] = {}  # prompt -> its domain_scale 0 image (the base's: the same all run)
        self.latest: torch.Tensor | None = None

    def start(self, *, trainer, base_fingerprint: str, bar=None, say: Callable[[str], None] = lambda text: None,
              board=None) -> None:
        """What the run made: the MODEL it trains (under dynamic VRAM the host's copy of the base),
        the base's fingerprint (a grid records it), the progress bar and text, the TensorBoard log."""
        self.trainer, self.bar, self.say, self.board = trainer, bar, say, board
        self.record["base"] = base_fingerprint

    # -- the loop's on_samples -------------------------------------------------------------------

    def __call__(self, step: int, weights: dict, resumed: bool = False) -> None:
        path = grid_path(self.folder, step)
        record = {**self.record, "weights": tensors_fingerprint(weights)}
        if resumed and self._load_if_made(path, record):
            return
        cells = self._sample(step, weights)
        image = grid_image(cells, self.settings.prompts, self.settings.scales,
                           f"step {step}  seed {self.settings.seed}  cfg {self.cfg:g}  {self.settings.steps} steps "
                           f"{SAMPLER} {self.scheduler}")
        info = PngInfo()
        info.add_text(METADATA_KEY, json.dumps({**record, "step": step}))
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
        log.info("Validation samples at step %d: %s", step, path)
        self._show(step, image)

    def _load_if_made(self, path: str, record: dict) -> bool:
        """True if `path` is a grid of these weights and settings (then it is the latest)."""
        try:
            with Image.open(path) as image:
                made = json.loads(image.text.get(METADATA_KEY, "null")) or {}
                image.load()
                grid = image.convert("RGB")
        except (OSError, ValueError):
            return False
        if {k: made.get(k) for k in record} != record:
            log.info("Validation samples: %s was made of other weights or settings; sampled again", path)
            return False
        self.latest = image_tensor(grid)
        return True

    def _show(self, step: int, image: Image.Image) -> None:
        self.latest = image_tensor(image)
        if self.board is not None:
            self.board.image(TENSORBOARD_TAG, np.asarray(image), step)
        if self.bar is not None:
            self.bar.update_absolute(min(step, self.total_steps), self.total_steps, ("PNG", image, 512))

    # -- sampling ----------------------------------------------------------------------------

    def _sample(self, step: int, weights: dict) -> list[list[np.ndarray]]:
        """Every image of the grid (rows: prompts; columns: domain scales), uint8 [H, W, 3]."""
        device = comfy.model_management.get_torch_device()
        graphs_before = set(OWNER.graphs)
        domain = None
        n, done = len(self.positives) * len(self.settings.scales), 0
        try:
            with torch.inference_mode(), torch.random.fork_rng(devices=_rng_devices(device)):
                domain = self.make_domain(weights)
                rows = []
                for i, positive in enumerate(self.positives):
                    row = []
                    for scale in self.settings.scales:
                        comfy.model_management.throw_exception_if_processing_interrupted()
                        done += 1
                        self.say(f"validation samples at step {step}: {done}/{n}")
                        if scale == 0 and i in self.fixed:
                            row.append(self.fixed[i])
                            continue
                        row.append(self._image(domain, positive, scale))
                        if scale == 0:
                            self.fixed[i] = row[-1]
                    rows.append(row)
        finally:
            self._give_back(domain, graphs_before)
        if self.mode != "full":  # the host may have moved or unloaded the UNet to sample or decode
            load_for_training(self.trainer)
        return rows

    def _image(self, domain, positive, scale: float) -> np.ndarray:
        """One image: KSampler (Domain Guidance) -> VAE Decode -> Save Image's pixels."""
        terms = collect_terms(domain, scale, 0.0, 1.0, None)
        guider = make_guider(self.model, positive, self.null, self.null, self.cfg, terms, False)
        shape = [1, self.host.latent_channels] + [1] * (self.host.latent_dimensions - 2) + [self.side, self.side]
        latent = sample_like_ksampler(guider, self.settings.seed, self.settings.steps, SAMPLER, self.scheduler,
                                      {"samples": torch.zeros(shape)}, 1.0, callback=_check_interrupt, disable_pbar=True)
        images = self.vae.decode(latent["samples"])
        if images.ndim == 5:  # (a video VAE's frames, as VAE Decode combines them)
            images = images.reshape(-1, *images.shape[-3:])
        return np.clip(255.0 * images[0].float().cpu().numpy(), 0, 255).astype(np.uint8)

    def _give_back(self, domain, graphs_before: set) -> None:
        """What the sampling loaded and captured, let go: the CUDA graphs it captured, the domain
        MODEL (full mode; a LoRA domain is the base's clone), and in full mode the base, which the
        training does not read (the host loads it again for the next samples)."""
        OWNER.drop([key for key in OWNER.graphs if key not in graphs_before], "the validation samples are taken")
        if self.mode == "full":
            if domain is not None:
                release(domain)
            release(self.model)
        elif self.trainer is not self.model:  # under dynamic VRAM the base sampled is not the copy trained
            release(self.model)


def _check_interrupt(step, x0, x, total_steps) -> None:
    """The sampler's callback: the host's Cancel between steps."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _rng_devices(device: torch.device) -> list:
    """The CUDA devices whose random state fork_rng keeps (the host's noise reseeds the global state)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A picture as an IMAGE [1, H, W, 3] float 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


def no_samples_image() -> torch.Tensor:
    """The validation_samples output where there are none (no validation_prompts)."""
    image = Image.new("RGB", (320, 48), "white")
    ImageDraw.Draw(image).text((8, 16), "no validation_prompts: no validation samples", fill="black")
    return image_tensor(image)


# -- the grid ------------------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: the fixed bitmap font
        return ImageFont.load_default()


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Where the images of a grid of `rows` x `cols` images of cell_h x cell_w pixels are: a title
    band, a band of column labels, then per row a band with its prompt above its images."""
    rows: int
    cols: int
    cell_h: int
    cell_w: int

    @property
    def band(self) -> int:
        return self.font_size + 8

    @property
    def font_size(self) -> int:
        return max(10, self.cell_w // 32)

    @property
    def gap(self) -> int:
        return 4

    def cell(self, row: int, col: int) -> tuple[int, int]:
        """(left, top) of the image of `row`, `col`."""
        return self.gap + col * (self.cell_w + self.gap), 2 * self.band + row * (self.band + self.cell_h) + self.band

    @property
    def size(self) -> tuple[int, int]:
        return self.gap + self.cols * (self.cell_w + self.gap), 2 * self.band + self.rows * (self.band + self.cell_h) + self.gap


def grid_image(cells: list[list[np.ndarray]], prompts, scales, title: str) -> Image.Image:
    """The images (rows: prompts, columns: domain scales) on a white grid (GridLayout), labelled."""
    cell_h, cell_w = cells[0][0].shape[:2]
    layout = GridLayout(len(cells), len(cells[0]), cell_h, cell_w)
    image = Image.new("RGB", layout.size, "white")
    draw, font = ImageDraw.Draw(image), _font(layout.font_size)
    width = layout.size[0] - 2 * layout.gap
    draw.text((layout.gap, 3), _fitted(draw, font, title, width), fill="black", font=font)
    for col, scale in enumerate(scales):
        left, _ = layout.cell(0, col)
        draw.text((left, layout.band + 3), _fitted(draw, font, f"domain_scale {scale:g}", cell_w), fill="black", font=font)
    for row, prompt in enumerate(prompts):
        _, top = layout.cell(row, 0)
        draw.text((layout.gap, top - layout.band + 3), _fitted(draw, font, f"{row + 1}. {prompt}", width),
                  fill=(30, 60, 150), font=font)
        for col in range(len(scales)):
            image.paste(Image.fromarray(cells[row][col]), layout.cell(row, col))
    return image


def _fitted(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """`text`, cut short with "..." to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def samples_folder(stem: str) -> str:
    """output/indomain_previews/<stem>: the previews' folder."""
    return os.path.join(folder_paths.get_output_directory(), "indomain_previews", stem)
