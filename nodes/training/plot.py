"""The loss-curve IMAGE of Train Domain UNet (drawn with Pillow, which the host ships)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 320, 40
VALIDATION = (230, 120, 20)  # the validation series' colour


def smoothed(values: list[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: the trend through noisy per-step losses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out


def loss_curve_image(losses: list[float], start_step: int = 0,
                     validation: list[tuple[int, float | None]] = ()) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: the per-step loss (grey) and its moving average (blue) against the step;
    the validation loss (orange points, joined) at the steps it was measured within this run's
    range (its start included: step 0 is the base)."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN + 20, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")
    if not losses:
        draw.text((left + 10, top + 10), "no training steps in this run (already complete)", fill="black")
    else:
        n = len(losses)
        last_step = start_step + n
        checked = [(s, v) for s, v in validation if v is not None and math.isfinite(v) and start_step <= s <= last_step]
        first_step = min([start_step + 1] + [s for s, _ in checked])
        lo, hi = min(losses + [v for _, v in checked]), max(losses + [v for _, v in checked])
        span = hi - lo or 1.0

        def xy(step: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * ((step - first_step) / max(1, last_step - first_step))
            return x, bottom - (bottom - top) * (v - lo) / span

        def dot(point, colour, r=2):
            draw.ellipse([point[0] - r, point[1] - r, point[0] + r, point[1] + r], fill=colour)

        for series, colour in ((losses, (170, 170, 170)), (smoothed(losses), (30, 90, 200))):
            points = [xy(start_step + 1 + i, v) for i, v in enumerate(series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                dot(points[0], colour)
        if checked:
            points = [xy(s, v) for s, v in checked]
            if len(points) > 1:
                draw.line(points, fill=VALIDATION, width=2)
            for point in points:
                dot(point, VALIDATION, 3)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {first_step}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {last_step}", fill="black")
        draw.text((left + 8, top + 4), f"loss (last {losses[-1]:.4g}, mean of last 10% {np.mean(losses[-max(1, n // 10):]):.4g})", fill="black")
        if checked:
            draw.text((left + 8, top + 18), f"validation (last {checked[-1][1]:.4g} at step {checked[-1][0]})", fill=VALIDATION)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)


def validation_text(validation: list[tuple[int, float | None]]) -> str:
    """The validation losses as text, one "step N: loss" line each ("" without validation)."""
    return "\n".join(f"step {s}: {'not finite' if v is None else f'{v:.6g}'}" for s, v in validation)
