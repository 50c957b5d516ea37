"""The latent cache: each bucketed image is VAE-encoded once, ever.

A cache file `<cache_dir>/<key>.latent` (safetensors under another extension, so model-folder
listings never show it) holds one latent [C, h, w]. The key is
    sha256(sha256(bucket size + image pixels after bucketing) + vae_id)
so a cache entry is reused by every run on the same image, bucket and VAE, whatever the file
is called. A cache file that cannot be read is re-encoded with a warning, never a crash.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open

from .checkpoint import atomic_save
from .data import BucketedImage, flip_horizontal

log = logging.getLogger(__name__)

CACHE_EXTENSION = ".latent"
CACHE_FORMAT = "indomain-latent/1"


@dataclass(frozen=True)
class CachedImage:
    """One training image as latents."""

    name: str
    bucket: tuple[int, int]  # (height, width) in pixels
    latent: torch.Tensor  # [C, h, w] float32, CPU
    flipped: torch.Tensor | None  # [C, h, w] the mirror image's latent (flip augmentation), else None


@dataclass(frozen=True)
class LatentSet:
    images: list[CachedImage]
    image_set: str  # sha256 over every image's pixel digest, in order: identifies the training set
    encoded: int  # how many latents were encoded in this call (cache misses)


def pixel_digest(pixels: np.ndarray) -> bytes:
    """sha256 of the bucket size and the bucketed image's pixels ([H, W, 3] uint8)."""
    h = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}|".encode())
    h.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return h.digest()


def cache_key(pixels: np.ndarray, vae_id: str) -> str:
    """The cache file's stem: the pixel digest and the VAE together."""
    return hashlib.sha256(pixel_digest(pixels) + vae_id.encode()).hexdigest()


def to_image_batch(pixels: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> the host's encode input [1, H, W, 3] float 0..1."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).float().div(255).unsqueeze(0)


def cached_latent(pixels: np.ndarray, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str, cache_dir: str) -> tuple[torch.Tensor, bool]:
    """The latent [C, h, w] of one bucketed image, from the cache or encoded (then cached).

    Returns (latent, encoded): encoded is True on a cache miss.
    """
    path = os.path.join(cache_dir, cache_key(pixels, vae_id) + CACHE_EXTENSION)
    if os.path.exists(path):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                latent = f.get_tensor("latent")
            if meta.get("format") != CACHE_FORMAT or meta.get("vae_id") != vae_id or latent.dim() != 3:
                raise ValueError("not a latent of this VAE")
            return latent, False
        except Exception as e:  # any unreadable cache file is re-encoded, never fatal
            log.warning("Latent cache file %s is unreadable (%s: %s); encoding the image again", path, type(e).__name__, e)
    latent = encode(to_image_batch(pixels))
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != 1:
        got = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"encode returned {got} for an image {list(pixels.shape)}; expected latents [1, C, h, w]")
    latent = latent[0].detach().float().cpu().contiguous()
    atomic_save(path, {"latent": latent}, {"format": CACHE_FORMAT, "vae_id": vae_id})
    return latent, True


def cache_latents(
    images: Iterable[BucketedImage],
    *,
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae_id: str,
    cache_dir: str | os.PathLike,
    flip: bool,
    check_interrupt: Callable[[], None] = lambda: None,
    on_image: Callable[[int, float], None] | None = None,
) -> LatentSet:
    """Every image's latent (and its mirror image's, with `flip`), encoding only cache misses.

    check_interrupt is called before each image; on_image(images_done, seconds) after each.
    """
    cache_dir = os.fspath(cache_dir)
    out, digests, encoded = [], hashlib.sha256(), 0
    t0 = time.monotonic()
    for image in images:
        check_interrupt()
        digests.update(pixel_digest(image.pixels))
        latent, miss = cached_latent(image.pixels, encode, vae_id, cache_dir)
        encoded += miss
        flipped = None
        if flip:
            flipped, miss = cached_latent(flip_horizontal(image.pixels), encode, vae_id, cache_dir)
            encoded += miss
        out.append(CachedImage(image.name, image.bucket, latent, flipped))
        if on_image is not None:
            on_image(len(out), time.monotonic() - t0)
    log.info("Latents for %d images ready (%d encoded, the rest from the cache in %s)", len(out), encoded, cache_dir)
    return LatentSet(out, digests.hexdigest(), encoded)
