"""Rendered shape images: the labelled base data and the unlabelled "domain" style.

Classes are shapes (circle, square, triangle, cross). Two styles:

* base style: a random background (flat, stripes at a random angle and period, or a checker
  board) in random colours, and a random foreground colour of opposite brightness;
* domain style: one fixed look, a sub-distribution of the base style family: diagonal
  navy/teal stripes of a fixed period behind a warm orange shape.

Everything is drawn with torch from an explicit generator, anti-aliased by supersampling,
and returned in [-1, 1] as float32 [N, 3, S, S].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLASSES = ("circle", "square", "triangle", "cross")
BASE_STYLE, DOMAIN_STYLE = 0, 1


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _shape_masks(labels: torch.Tensor, size: int, g: torch.Generator, ss: int = 4) -> torch.Tensor:
    """Soft coverage masks [N, 1, S, S] in [0, 1] of one shape per image."""
    n = labels.shape[0]
    big = size * ss
    coords = (torch.arange(big, dtype=torch.float32) + 0.5) / ss  # pixel units
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx = size / 2 + _uniform(n, -0.12, 0.12, g) * size
    cy = size / 2 + _uniform(n, -0.12, 0.12, g) * size
    r = _uniform(n, 0.27, 0.36, g) * size
    th = _uniform(n, -0.35, 0.35, g)
    dx = (xx[None] - cx[:, None, None]) / r[:, None, None]
    dy = (yy[None] - cy[:, None, None]) / r[:, None, None]
    c, s = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    u = c * dx + s * dy
    v = -s * dx + c * dy
    masks = torch.zeros(n, big, big)
    for k in range(len(CLASSES)):
        i = (labels == k).nonzero().flatten()
        if i.numel() == 0:
            continue
        du, dv, ddx, ddy = u[i], v[i], dx[i], dy[i]
        if k == 0:  # circle
            m = ddx * ddx + ddy * ddy <= 1.0
        elif k == 1:  # square
            m = torch.maximum(du.abs(), dv.abs()) <= 0.82
        elif k == 2:  # upward triangle: apex at v = -1, base at v = 0.75 (image y grows downwards)
            m = (dv <= 0.75) & (du.abs() <= (dv + 1.0) * 0.62)
        else:  # cross
            m = ((du.abs() <= 0.3) & (dv.abs() <= 1.0)) | ((dv.abs() <= 0.3) & (du.abs() <= 1.0))
        masks[i] = m.float()
    m = masks[:, None]
    return F.avg_pool2d(m, ss)


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    return torch.meshgrid(coords, coords, indexing="ij")


def _rand_colour(lum_lo: torch.Tensor, width: float, g: torch.Generator) -> torch.Tensor:
    """Random RGB colours [N, 3]; the mean channel value of colour i lies in [lum_lo[i], lum_lo[i] + width]."""
    n = lum_lo.shape[0]
    rgb = torch.rand(n, 3, generator=g)
    target = lum_lo[:, None] + width * torch.rand(n, 1, generator=g)
    rgb = rgb - rgb.mean(1, keepdim=True) + target
    return rgb.clamp(0.0, 1.0)


BACKGROUNDS = ("flat", "stripes", "checker")


def _base_background(n: int, size: int, dark: torch.Tensor, g: torch.Generator, kinds=(0, 1, 2)) -> torch.Tensor:
    yy, xx = _grid(size)
    lo = torch.where(dark, 0.05, 0.6)
    col_a = _rand_colour(lo, 0.3, g)
    col_b = _rand_colour(lo, 0.3, g)
    kinds_t = torch.tensor(kinds)
    kind = kinds_t[torch.randint(0, len(kinds), (n,), generator=g)]  # indices into BACKGROUNDS
    ang = _uniform(n, 0, math.pi, g)[:, None, None]
    period = _uniform(n, 0.2, 0.45, g)[:, None, None] * size
    phase = _uniform(n, 0, 1, g)[:, None, None]
    proj = (torch.cos(ang) * xx[None] + torch.sin(ang) * yy[None]) / period + phase
    stripes = (torch.frac(proj) < 0.5).float()
    cell = _uniform(n, 0.2, 0.4, g)[:, None, None] * size
    checker = ((torch.floor(xx[None] / cell) + torch.floor(yy[None] / cell)) % 2).float()
    pattern = torch.where(kind[:, None, None] == 1, stripes, torch.where(kind[:, None, None] == 2, checker, torch.zeros_like(stripes)))
    p = pattern[:, None]
    return col_a[:, :, None, None] * (1 - p) + col_b[:, :, None, None] * p


def _domain_background(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    yy, xx = _grid(size)
    navy = torch.tensor([0.08, 0.12, 0.38]) + _uniform(n, -0.03, 0.03, g)[:, None]
    teal = torch.tensor([0.05, 0.48, 0.52]) + _uniform(n, -0.03, 0.03, g)[:, None]
    period = size / 4.0
    phase = _uniform(n, 0, 1, g)[:, None, None]
    proj = (xx[None] + yy[None]) / (math.sqrt(2.0) * period) + phase  # 45 degree stripes
    p = (torch.frac(proj) < 0.5).float()[:, None]
    return navy[:, :, None, None] * (1 - p) + teal[:, :, None, None] * p


def render(labels: torch.Tensor, style: int, size: int, g: torch.Generator, base_kinds=(0, 1, 2)) -> torch.Tensor:
    """Images [N, 3, size, size] in [-1, 1] of the given shape labels in one style, on the 8-bit
    grid (pixel values k / 255), like every image that passes through training.train().

    base_kinds: the background kinds (indices into BACKGROUNDS) the base style draws from."""
    labels = labels.long()
    n = labels.shape[0]
    mask = _shape_masks(labels, size, g)
    if style == DOMAIN_STYLE:
        bg = _domain_background(n, size, g)
        fg = torch.stack([torch.full((n,), 0.97), _uniform(n, 0.5, 0.7, g), _uniform(n, 0.08, 0.2, g)], dim=1)
    else:
        dark = torch.rand(n, generator=g) < 0.5
        bg = _base_background(n, size, dark, g, base_kinds)
        fg = _rand_colour(torch.where(dark, 0.65, 0.0), 0.3, g)
    img = bg * (1 - mask) + fg[:, :, None, None] * mask
    img = (img.clamp(0, 1) * 255).round() / 255
    return (img * 2.0 - 1.0).float()


def make_set(n: int, style: int, size: int, seed: int, classes=CLASSES, base_kinds=(0, 1, 2),
             chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """n images with uniformly random labels: (images [n,3,S,S], labels [n]). Label i is the
    shape classes[i] (names from CLASSES). Rendered in chunks of `chunk` images (the
    supersampled masks of a chunk are held in memory)."""
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"classes: unknown shape(s) {unknown}; expected names from {CLASSES}")
    kinds = torch.tensor([CLASSES.index(c) for c in classes])
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(classes), (n,), generator=g)
    images = [render(kinds[labels[i:i + chunk]], style, size, g, base_kinds) for i in range(0, n, chunk)]
    return torch.cat(images), labels
