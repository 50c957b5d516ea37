"""Stand-ins for the host, shared by the training tests: a tiny UNet with ComfyUI's call signature,
a counting fake VAE, the empty-prompt conditioning, SD's noise schedule, synthetic image files.

The tests at the bottom pin down that the stand-ins behave like the host's pieces.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from training import TrainConfig, train

@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models train faster (and the tests time more steadily) on one thread; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONTEXT = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(123))  # the "empty prompt": 3 tokens of dim 8


class OpsLinear(nn.Linear):
    """Like ComfyUI's ops classes: an nn.Linear subclass with attributes of its own."""

    comfy_cast_weights = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_function = []


class TinyUNet(nn.Module):
    """forward(x, timesteps, context=None, y=None, **kwargs) -> like x, as ComfyUI's UNetModel.

    conv_in -> + time embedding -> proj_in (1x1) -> cross-attention (to_q/to_k/to_v/to_out.0)
    -> feed-forward (ff.net.0 / ff.net.2) -> proj_out (1x1) -> conv_out (3x3).
    """

    def __init__(self, channels: int = 4, width: int = 16, context_dim: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.time_embed = nn.Linear(2, width)
        self.proj_in = nn.Conv2d(width, width, 1)
        self.to_q = OpsLinear(width, width)
        self.to_k = nn.Linear(context_dim, width)
        self.to_v = nn.Linear(context_dim, width)
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(0.0))
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.proj_out = nn.Conv2d(width, width, 1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.nan = False  # tests set this to make the model return NaN

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options={}, **kwargs):
        t = timesteps.float()[:, None] / 1000.0
        h = self.conv_in(x) + self.time_embed(torch.cat([torch.sin(math.pi * t), torch.cos(math.pi * t)], 1))[:, :, None, None]
        h = self.proj_in(h)
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # [B, hw, c]
        q, k, v = self.to_q(tokens), self.to_k(context), self.to_v(context)
        tokens = tokens + self.to_out(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), -1) @ v)
        tokens = tokens + self.ff.net(tokens)
        h = self.proj_out(tokens.transpose(1, 2).reshape(b, c, hh, ww))
        out = self.conv_out(F.silu(h))
        return out * float("nan") if self.nan else out


def tiny_unet(seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet()


class FakeVAE:
    """encode: [1, H, W, 3] 0..1 -> [1, 4, H/8, W/8] (8x8 average pooling); counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dim() == 4 and images.shape[-1] == 3 and images.dtype == torch.float32
        self.calls += 1
        x = F.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)


def cond_for(height: int, width: int) -> dict[str, torch.Tensor]:
    return {"context": CONTEXT}


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule (beta 0.00085 .. 0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def write_image(path, width: int, height: int, seed: int = 0) -> str:
    """A smooth synthetic picture (a coloured gradient with a disc) saved with Pillow."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r).astype(float)
    rgb = np.stack([xx, yy, disc], -1) * rng.uniform(0.5, 1.0, 3)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return os.fspath(path)


def image_folder(root, n: int = 4, size: int = 64) -> str:
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(folder / f"img{i}.png", size, size, seed=i)
    return os.fspath(folder)


class Interrupted(Exception):
    """Stands for the host's interrupt exception."""


def run_stopped_in_step(tmp_path, step: int, **config) -> None:
    """run() stopped by an interrupt at the first check of `step` (once step - 1 updates are done)."""
    done = []

    def stop():
        if done and done[-1] >= step - 1:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run(tmp_path, check_interrupt=stop, on_progress=lambda p: done.append(p.step) if p.stage == "train" else None,
            **config)


def run(tmp_path, unet=None, vae=None, state_name="state.train", **config):
    """train() with the stand-ins on a folder of 4 synthetic 64x64 images at resolution 64, fp32."""
    folder = tmp_path / "images"
    if not folder.exists():
        image_folder(tmp_path)
    defaults = dict(steps=10, mode="full", lr=1e-3, resolution=64, precision="fp32", batch_size=2)
    kwargs = {k: config.pop(k) for k in ("check_interrupt", "on_progress", "on_preview", "on_checkpoint", "on_samples") if k in config}
    return train(
        unet if unet is not None else tiny_unet(),
        os.fspath(folder),
        encode=vae if vae is not None else FakeVAE(),
        vae_id="fake-vae",
        cond_for=cond_for,
        alphas_cumprod=sd_alphas_cumprod(),
        prediction_type=config.pop("prediction_type", "eps"),
        config=TrainConfig(**{**defaults, **config}),
        cache_dir=os.fspath(tmp_path / "cache"),
        state_path=None if state_name is None else os.fspath(tmp_path / state_name),
        **kwargs,
    )
