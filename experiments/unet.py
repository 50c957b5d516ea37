"""A small class-conditional UNet for the in-domain reproduction (pure torch).

The class embedding has one extra row, index `num_classes`, for the null condition (the
empty prompt): classifier-free guidance and the text-free domain model both use it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """UNet with len(channels) resolutions, one ResBlock per level down and up.

    forward(x [B,C,H,W], t [B] (timestep index, float ok), y [B] long in 0..num_classes,
    where y == num_classes is the null condition) -> prediction shaped like x.
    """

    def __init__(self, in_ch: int = 3, channels=(32, 64, 64), num_classes: int = 4, emb_dim: int = 128, patch: int = 1):
        super().__init__()
        self.patch = patch
        img_ch = in_ch
        in_ch = in_ch * patch * patch
        self.num_classes = num_classes
        self.null_class = num_classes
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.inp = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        ch = channels[0]
        skips = []
        for i, c in enumerate(channels):
            self.down.append(ResBlock(ch, c, emb_dim))
            skips.append(c)
            ch = c
            last = i == len(channels) - 1
            self.pool.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(ch, ch, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            self.up.append(ResBlock(ch + skips[i], c, emb_dim))
            ch = c
            self.upsample.append(nn.Identity() if i == 0 else nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = _norm(ch)
        self.out = nn.Conv2d(ch, in_ch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim)) + self.class_emb(y)
        emb = F.silu(emb)
        if self.patch > 1:
            x = F.pixel_unshuffle(x, self.patch)
        h = self.inp(x)
        hs = []
        for block, pool in zip(self.down, self.pool):
            h = block(h, emb)
            hs.append(h)
            h = pool(h)
        h = self.mid(h, emb)
        for block, up in zip(self.up, self.upsample):
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = up(h)
        out = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out
