"""The latent cache: each bucketed image is VAE-encoded once, ever, and read from disk when a batch needs it.

A cache file `<cache_dir>/<key>.latent` (safetensors under another extension, so model-folder
listings never show it) holds one latent [C, h, w]. The key is
    sha256(sha256(bucket size + image pixels after bucketing) + vae_id)
so a cache entry is reused by every run on the same image, bucket and VAE, whatever the file
is called. A cache file that cannot be read is re-encoded with a warning, never a crash.

The training set in memory is only each image's name, bucket and cache-file paths (`LatentFile`):
a batch reads its few latents from their files (safetensors reads them memory-mapped), so a
folder of 20,000 images costs a few MB of RAM, not every latent (64 KiB each at 512 px, twice with
flips). Under torchrun the encoding is sharded: rank k encodes images k, k + N, ... and the ranks
exchange the (small) records, so every rank ends with the same LatentSet (distributed.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open

from .checkpoint import atomic_save, atomic_write
from .data import BucketedImage, flip_horizontal
from .distributed import Ranks, StoppedByPeer, agree_flag, gather_objects, mark_own

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


def read_latent(path: str) -> torch.Tensor:
    """One cached latent [C, h, w] float32 from its file."""
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("latent")


@dataclass(frozen=True)
class LatentFile:
    """One training image whose latents stay on disk: `latent` and `flipped` read its cache files
    each time they are asked for (the same tensors a CachedImage holds)."""

    name: str
    bucket: tuple[int, int]  # (height, width) in pixels
    path: str
    flipped_path: str | None  # the mirror image's latent (flip augmentation), else None
    digest: bytes = b""  # pixel_digest of the bucketed image
    index: int = -1  # its place in the ImageSet
    signature: str | None = None  # its file's data.file_signature when it was read (None: in memory)

    @property
    def latent(self) -> torch.Tensor:
        return read_latent(self.path)

    @property
    def flipped(self) -> torch.Tensor | None:
        return None if self.flipped_path is None else read_latent(self.flipped_path)


@dataclass(frozen=True)
class LatentSet:
    images: list[CachedImage] | list[LatentFile]
    image_set: str  # sha256 over every image's pixel digest, in order: identifies the training set
    encoded: int  # how many latents were encoded in this call (cache misses)


class FileIndex:
    """`<cache_dir>/files-<key>.json`: for each folder image seen at this resolution, flip setting and
    VAE, keyed by (absolute path, size, modification time), its pixel digest, bucket and latent
    files. A later run skips reading and decoding an unchanged image whose latent files are still
    usable (a folder of 20,000 images: about 140 s of decoding on two CPU cores); a changed file,
    a missing or unusable latent file, or an unreadable index means the image is read as before.
    Files given as an in-memory batch are always hashed."""

    FORMAT = "indomain-latent-index/1"

    def __init__(self, cache_dir: str | os.PathLike, vae_id: str, resolution: int, flip: bool):
        self.cache_dir, self.vae_id, self.flip = os.fspath(cache_dir), vae_id, flip
        key = hashlib.sha256(f"{self.FORMAT}|{vae_id}|{resolution}|{flip}".encode()).hexdigest()[:16]
        self.path = os.path.join(self.cache_dir, f"files-{key}.json")
        try:
            with open(self.path) as f:
                data = json.load(f)
            self.entries = data["entries"] if data.get("format") == self.FORMAT else {}
        except Exception:  # none yet, or unreadable: every image is read
            self.entries = {}

    def known(self, name: str, index: int, signature: str) -> LatentFile | None:
        """Image `index` from the index, if its file (by `signature`) and its latent files are unchanged."""
        entry = self.entries.get(signature)
        if entry is None or (entry.get("flipped") is not None) != self.flip:
            return None
        path = os.path.join(self.cache_dir, entry["path"])
        flipped = os.path.join(self.cache_dir, entry["flipped"]) if self.flip else None
        if not _usable(path, self.vae_id) or (flipped is not None and not _usable(flipped, self.vae_id)):
            return None
        return LatentFile(name, tuple(entry["bucket"]), path, flipped, bytes.fromhex(entry["digest"]), index, signature)

    def save(self, images: list[LatentFile]) -> None:
        """Add this run's folder images and write the index atomically (rank 0 only)."""
        for image in images:
            if image.signature is not None:
                self.entries[image.signature] = {
                    "digest": image.digest.hex(), "bucket": list(image.bucket), "path": os.path.basename(image.path),
                    "flipped": None if image.flipped_path is None else os.path.basename(image.flipped_path)}

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump({"format": self.FORMAT, "entries": self.entries}, f)
        try:
            atomic_write(self.path, write)
        except OSError as e:  # an index is a speed-up only
            log.warning("Could not write the latent cache's file index %s (%s)", self.path, e)


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


def _usable(path: str, vae_id: str) -> bool:
    """True if `path` is a readable latent of this VAE (header and shape only; the data stays on disk).
    A file that exists but cannot be used is reported and encoded again."""
    if not os.path.exists(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shape = f.get_slice("latent").get_shape()
        if meta.get("format") != CACHE_FORMAT or meta.get("vae_id") != vae_id or len(shape) != 3:
            raise ValueError("not a latent of this VAE")
        if os.path.getsize(path) < 4 * int(np.prod(shape)):
            raise ValueError("the file is shorter than its header says")
        return True
    except Exception as e:  # any unreadable cache file is re-encoded, never fatal
        log.warning("Latent cache file %s is unreadable (%s: %s); encoding the image again", path, type(e).__name__, e)
        return False


def cached_latent_file(pixels: np.ndarray, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str, cache_dir: str) -> tuple[str, bool]:
    """The cache file of one bucketed image's latent [C, h, w], encoding (and caching) it on a miss.

    Returns (path, encoded): encoded is True on a cache miss.
    """
    path = os.path.join(cache_dir, cache_key(pixels, vae_id) + CACHE_EXTENSION)
    if _usable(path, vae_id):
        return path, False
    latent = encode(to_image_batch(pixels))
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != 1:
        got = list(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
        raise ValueError(f"encode returned {got} for an image {list(pixels.shape)}; expected latents [1, C, h, w]")
    latent = latent[0].detach().float().cpu().contiguous()
    atomic_save(path, {"latent": latent}, {"format": CACHE_FORMAT, "vae_id": vae_id})
    return path, True


def cached_latent(pixels: np.ndarray, encode: Callable[[torch.Tensor], torch.Tensor], vae_id: str, cache_dir: str) -> tuple[torch.Tensor, bool]:
    """The latent [C, h, w] of one bucketed image, from the cache or encoded (then cached).

    Returns (latent, encoded): encoded is True on a cache miss.
    """
    path, encoded = cached_latent_file(pixels, encode, vae_id, cache_dir)
    return read_latent(path), encoded


def check_shared(ranks: Ranks, cache_dir: str, others: list[str]) -> None:
    """ValueError on every rank unless each rank sees a latent file of each other rank's: the ranks
    read each other's cache files, so across machines the cache folder must be on a filesystem they
    share (NFS, Lustre ...), as the images folder and the state's folder must."""
    missing = [p for p in others if not os.path.exists(p)]
    failed = agree_flag(ranks, bool(missing))
    if failed:
        seen = f"rank {ranks.rank} cannot read {missing[0]!r}" if missing else f"rank {failed[0]} cannot read another rank's files"
        raise ValueError(f"the latent cache folder {cache_dir!r} is not shared by every process: {seen} (written by another "
                         "machine). Under torchrun across machines, put ComfyUI's models folder (--base-directory; the "
                         "cache is a hidden folder in domain_unets), the images and the outputs on a filesystem every "
                         "machine mounts at the same path")


def cache_latents(
    images: Iterable[BucketedImage],
    *,
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae_id: str,
    cache_dir: str | os.PathLike,
    flip: bool,
    check_interrupt: Callable[[], None] = lambda: None,
    on_image: Callable[[int, float], None] | None = None,
    ranks: Ranks = Ranks(),
) -> LatentSet:
    """Every image's latent file (and its mirror image's, with `flip`), encoding only cache misses;
    the latents stay on disk (LatentFile).

    check_interrupt is called before each image; on_image(images_done, seconds) after each.
    Under torchrun (`ranks` active) `images` is this rank's shard (ImageSet.bucketed(shard=...)):
    the ranks' records are gathered, in image order, so every rank returns the whole set; a rank
    that fails or is interrupted stops every rank (the others raise StoppedByPeer).
    """
    cache_dir = os.fspath(cache_dir)
    records, encoded, failure = [], 0, None
    t0 = time.monotonic()
    try:
        for image in images:
            check_interrupt()
            if isinstance(image, LatentFile):  # cached, and its file unchanged (FileIndex)
                path, flipped, digest = image.path, image.flipped_path, image.digest
            else:
                path, miss = cached_latent_file(image.pixels, encode, vae_id, cache_dir)
                encoded += miss
                flipped = None
                if flip:
                    flipped, miss = cached_latent_file(flip_horizontal(image.pixels), encode, vae_id, cache_dir)
                    encoded += miss
                digest = pixel_digest(image.pixels)
            # plain values only: the ranks exchange them (pickled), and a host may load this package under another name
            records.append((image.index, digest, image.name, tuple(image.bucket), path, flipped, image.signature))
            if on_image is not None:
                on_image(len(records), time.monotonic() - t0)
    except BaseException as e:
        if not ranks.active:
            raise
        failure = mark_own(ranks, e)
    if ranks.active:  # every rank learns whether any rank failed, then the records
        failed = agree_flag(ranks, failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise StoppedByPeer(f"stopped because rank {failed[0]} stopped while encoding latents (its message says why)")
        gathered = gather_objects(ranks, (records, encoded))
        check_shared(ranks, cache_dir, [rec[4] for k, (recs, _) in enumerate(gathered) if k != ranks.rank for rec in recs[:1]])
        records = sorted((rec for recs, _ in gathered for rec in recs), key=lambda rec: rec[0])
        encoded = sum(n for _, n in gathered)
    digests = hashlib.sha256()
    for _, digest, *_ in records:
        digests.update(digest)
    out = [LatentFile(name, tuple(bucket), path, flipped, digest, index, signature)
           for index, digest, name, bucket, path, flipped, signature in records]
    if ranks.main:
        log.info("Latents for %d images ready (%d encoded, the rest from the cache in %s)", len(out), encoded, cache_dir)
    return LatentSet(out, digests.hexdigest(), encoded)
