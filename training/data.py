"""Training images: a folder of captionless image files, or an in-memory IMAGE batch.

The paper trains the domain UNet on images alone (no captions). Every image is fitted to one
aspect-ratio bucket (sides multiples of 64, area <= resolution^2, aspect ratio up to 2:1) by
resizing it to cover the bucket and cropping the centre, so no image is rejected for its size:
small ones are upscaled. Images are read one at a time; nothing holds the whole set in memory.

A folder name is resolved inside the host's input directory (resolve_image_folder: never outside
it, unless the headless trainer asks), and image_folder_fingerprint tells when its files changed.

Pillow is used here only to read, orient and resize image files (ComfyUI ships it).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKET_MULTIPLE = 64
MAX_ASPECT = 2.0
# What Pillow raises for a file it cannot decode (corrupt, truncated, not an image, too large).
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class BucketedImage:
    """One training image fitted to its bucket."""

    name: str  # the file name, or "images[i]" for an in-memory batch
    pixels: np.ndarray  # [H, W, 3] uint8, H x W = the bucket
    index: int = 0  # its place in the ImageSet (the training order)
    signature: str | None = None  # file_signature of its file, taken before it was read (None: in memory)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]  # (height, width) in pixels


def make_buckets(resolution: int, max_aspect: float = MAX_ASPECT, multiple: int = BUCKET_MULTIPLE) -> list[tuple[int, int]]:
    """The (height, width) buckets for `resolution`: sides multiples of 64, area <= resolution^2,
    aspect ratio at most `max_aspect`, the square included; one (the largest) per aspect ratio.

    For each width the tallest height that fits (area and aspect), then the transposes;
    e.g. 512 gives 320x640, 384x640, 448x576, 512x512, 576x448, 640x384, 640x320 (h x w).
    """
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"resolution={resolution} must be a multiple of {multiple} (e.g. 512 for SD1, 1024 for SDXL)")
    area = resolution * resolution
    found: dict[float, tuple[int, int]] = {}
    for width in range(multiple, int(area / multiple) + 1, multiple):
        height = min(area // width, int(max_aspect * width)) // multiple * multiple
        if height < multiple or width / height > max_aspect:
            continue
        for h, w in ((height, width), (width, height)):
            best = found.get(w / h)
            if best is None or h * w > best[0] * best[1]:
                found[w / h] = (h, w)
    return sorted(found.values(), key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height x width (compared in log space)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - ratio))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Resize `image` to cover the bucket (keeping its aspect), crop the centre: [H, W, 3] uint8."""
    bh, bw = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return np.array(image.crop((left, top, left + bw, top + bh)).convert("RGB"), dtype=np.uint8)


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """The image files directly in `folder` (png/jpg/jpeg/webp/bmp, any case), sorted by name.

    Raises ValueError naming the folder when it is missing, not a folder, or holds no image file.
    """
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise ValueError(f"image folder {folder!r} does not exist; give the folder holding your domain images")
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} is a file, not a folder; give the folder holding your domain images")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ValueError(f"image folder {folder!r} has no image files (expected {', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def resolve_image_folder(image_folder: str, input_dir: str, *, anywhere: bool = False) -> str:
    """The folder `image_folder` names: a relative path is inside `input_dir` (ComfyUI's input directory).

    Unless `anywhere` (the headless trainer), the folder must lie inside the input directory after
    resolving symlinks and '..' (as Load Image reads only from there), so that a shared server
    cannot be made to train on arbitrary server paths; otherwise a ValueError names the folder and
    the allowed root."""
    folder = image_folder.strip()
    path = folder if os.path.isabs(folder) else os.path.join(input_dir, folder)
    if anywhere:
        return path
    root, real = os.path.realpath(input_dir), os.path.realpath(path)
    try:
        inside = os.path.commonpath([root, real]) == root
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        raise ValueError(f"image_folder {image_folder!r} is outside ComfyUI's input directory {root} (it resolves to {real}): "
                         "only folders inside the input directory are read; put the images in a folder there, e.g. "
                         f"{os.path.join(root, 'my_domain_images')}, and give its name ('my_domain_images')")
    return real


def image_folder_fingerprint(image_folder: str, input_dir: str) -> str:
    """A cheap fingerprint of the images in `image_folder` (names, sizes, modification times; the
    contents are not read): changes when an image is added, removed or rewritten. The node's
    fingerprint_inputs, so the host runs the training again then and reuses its output otherwise."""
    if not image_folder or not image_folder.strip():
        return ""
    try:
        folder = resolve_image_folder(image_folder, input_dir)
        entries = []
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    st = entry.stat()
                    entries.append(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}")
    except (OSError, ValueError) as e:  # the run reports it; a failed run is not cached
        return f"error: {e}"
    return hashlib.sha256("\n".join([folder, *sorted(entries)]).encode()).hexdigest()


def file_signature(path: str) -> str | None:
    """The file's absolute path, size and modification time (None if it cannot be read): the same
    string while the file is unchanged."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def read_image(path: str) -> Image.Image:
    """An image file as RGB, turned upright by its EXIF orientation. Raises what Pillow raises."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


class ImageSet:
    """The training images: a folder path, a ComfyUI IMAGE batch (tensor [B, H, W, 3], 0..1), or a list of both.

    The input is checked at construction (errors name it); images are read by `bucketed`.
    """

    def __init__(self, images: str | os.PathLike | torch.Tensor | Sequence[str | os.PathLike | torch.Tensor]):
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if not sources:
            raise ValueError("images: no training images given; connect an IMAGE batch or give an image folder")
        self.names: list[str] = []
        self.files: list[str | None] = []  # each image's file (None: from an in-memory batch)
        self._loaders: list[Callable[[], Image.Image]] = []
        origins = []
        for source in sources:
            if isinstance(source, torch.Tensor):
                if source.dim() != 4 or source.shape[-1] != 3 or source.shape[0] == 0:
                    raise ValueError(f"images: expected an IMAGE batch shaped [B, H, W, 3] with B >= 1, got {list(source.shape)}")
                batch = (source.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
                origins.append("the image batch")
                self.names += [f"images[{i}]" for i in range(len(batch))]
                self.files += [None] * len(batch)
                self._loaders += [lambda a=a: Image.fromarray(a) for a in batch]
            else:
                files = list_image_files(source)
                origins.append(f"image folder {os.fspath(source)!r}")
                self.names += [os.path.basename(f) for f in files]
                self.files += list(files)
                self._loaders += [lambda f=f: read_image(f) for f in files]
        self.origin = " and ".join(origins)

    def __len__(self) -> int:
        return len(self.names)

    def bucketed(self, resolution: int, shard: tuple[int, int] = (0, 1), unreadable: list[str] | None = None,
                 known: Callable[[int, str], object | None] | None = None) -> Iterator[BucketedImage]:
        """Each readable image fitted to its bucket, in order. Unreadable files are skipped with one
        warning listing them (after the last image); if none is readable, ValueError names the origin.

        shard (rank, world): only images rank, rank + world, ... (one rank's share under torchrun).
        With `unreadable` given, the unreadable files are appended to it instead (no warning, no
        error): the caller reports them for every shard together (`report_unreadable`).
        known(index, signature): what to yield instead of reading the file of image `index`, whose
        file_signature is `signature` (e.g. a latents.LatentFile from the cache's file index), or None
        to read it.
        """
        buckets = make_buckets(resolution)
        rank, world = shard
        skipped = [] if unreadable is None else unreadable
        for index in range(rank, len(self.names), world):
            name = self.names[index]
            signature = file_signature(self.files[index]) if self.files[index] is not None else None
            hit = known(index, signature) if known is not None and signature is not None else None
            if hit is not None:
                yield hit
                continue
            try:
                image = self._loaders[index]()
            except _UNREADABLE as e:
                skipped.append(f"{name} ({type(e).__name__}: {e})")
                continue
            yield BucketedImage(name, fit_to_bucket(image, nearest_bucket(image.height, image.width, buckets)), index, signature)
        if unreadable is None:
            self.report_unreadable(skipped)

    def report_unreadable(self, unreadable: list[str], warn: bool = True) -> None:
        """The warning listing unreadable files (if `warn`); ValueError if no image was readable."""
        if unreadable and warn:
            log.warning("Skipped %d unreadable image file(s) in %s: %s", len(unreadable), self.origin, "; ".join(unreadable))
        if len(unreadable) == len(self.names):
            raise ValueError(f"none of the {len(self.names)} image file(s) in {self.origin} could be read; check that they are valid images")


def flip_horizontal(pixels: np.ndarray) -> np.ndarray:
    """The mirror image [H, W, 3] (the flip augmentation; applied before encoding, so cached)."""
    return np.ascontiguousarray(pixels[:, ::-1])
