"""The loss-curve IMAGE of Train Domain UNet (drawn with Pillow, which the host ships)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 320, 40


def smoothed(values: list[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: the trend through noisy per-step losses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out


def loss_curve_image(losses: list[float], start_step: int = 0) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: the per-step loss (grey) and its moving average (blue) against the step."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN + 20, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline="black")
    if not losses:
        draw.text((left + 10, top + 10), "no training steps in this run (already complete)", fill="black")
    else:
        lo, hi = min(losses), max(losses)
        span = hi - lo or 1.0
        n = len(losses)

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, n - 1))
            return x, bottom - (bottom - top) * (v - lo) / span

        for series, colour in ((losses, (170, 170, 170)), (smoothed(losses), (30, 90, 200))):
            points = [xy(i, v) for i, v in enumerate(series)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {start_step + 1}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {start_step + n}", fill="black")
        draw.text((left + 8, top + 4), f"loss (last {losses[-1]:.4g}, mean of last 10% {np.mean(losses[-max(1, n // 10):]):.4g})", fill="black")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
