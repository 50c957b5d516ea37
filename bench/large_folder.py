"""Large-folder benchmark: encode a folder of many images into the latent cache, then train one
epoch, measuring throughput and the peak resident memory (RSS) of the process.

    python -m bench.large_folder --out DIR [--images 20000] [--size 128] [--resolution 512] [--batch-size 32]
    torchrun --nproc-per-node 2 -m bench.large_folder --out DIR ...   (sharded encoding, DDP)

Pure torch (training/, no ComfyUI host): the images are small synthetic PNGs (--size px,
written once into DIR/images and reused), each fitted to a --resolution bucket as in training
(upscaled: 512 px gives latents [4, 64, 64], 64 KiB each, twice with flips: 2.5 GiB for 20,000
images if they were held in RAM). The "VAE" is an 8x average pool (cheap, deterministic: the
measurement is of the data path, not of a VAE) and the model the tests' tiny UNet, so the time
is the pipeline's: reading, bucketing, hashing, caching and the lazy reads of each batch.
Writes DIR/large_folder.json: images, encode s and images/s, epoch steps, train images/s, peak
RSS (MiB, rank 0; ru_maxrss) and RSS after encoding.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from PIL import Image  # noqa: E402

from training import TrainConfig, train  # noqa: E402
from training.distributed import ranks  # noqa: E402
from training.data import ImageSet, list_image_files, make_buckets, nearest_bucket  # noqa: E402

log = logging.getLogger("bench.large_folder")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_images(folder: str, n: int, size: int) -> None:
    """n small PNGs (square and 2:1, random colours and a gradient), written once."""
    os.makedirs(folder, exist_ok=True)
    have = len([f for f in os.listdir(folder) if f.endswith(".png")])
    if have >= n:
        return
    rng = np.random.default_rng(have)
    for i in range(have, n):
        w = size if i % 3 else 2 * size  # a third of them 2:1 (another bucket)
        colour = rng.uniform(0, 255, (1, 1, 3))
        ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.5, 1, size)[:, None, None]
        Image.fromarray((colour * ramp).astype(np.uint8)).save(os.path.join(folder, f"im{i:06d}.png"))


def pool_encode(images: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 8)
    return torch.cat([x, x.mean(1, keepdim=True)], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        gpu = torch.cuda.is_available() and not args.cpu
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if gpu else "gloo")
    r = ranks()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    folder, cache = os.path.join(args.out, "images"), os.path.join(args.out, "cache")
    if r.main:
        t = time.monotonic()
        write_images(folder, args.images, args.size)
        log.info("%d images in %s (%.0f s to write)", args.images, folder, time.monotonic() - t)
    if r.active:
        torch.distributed.barrier()
    try:
        import pytest  # noqa: F401  (tests/support/standins.py's fixtures; a GPU box may have no pytest)
    except ImportError:
        import types

        sys.modules["pytest"] = types.SimpleNamespace(fixture=lambda *a, **k: (lambda f: f))
    from tests.support.standins import cond_for, sd_alphas_cumprod, tiny_unet

    marks = {"rss_at_start": rss_mib()}

    def progress(p) -> None:
        if p.stage == "cache":
            marks.setdefault("cache_start", time.monotonic())
            marks["cache_end"] = time.monotonic()
            marks["rss_after_cache"] = rss_mib()
            if p.step % 1000 < r.world or p.step == p.total:
                log.info("latents %d/%d  %.1f img/s  ETA %.0f s  RSS %.0f MiB", p.step, p.total, p.images_per_s, p.eta_s, rss_mib())
        else:
            marks.setdefault("train_start", time.monotonic())
            marks["train_end"], marks["last_step"] = time.monotonic(), p.step
            if p.step % 50 == 0 or p.step == p.total:
                log.info("step %d/%d  %.1f img/s  ETA %.0f s  RSS %.0f MiB", p.step, p.total, p.images_per_s, p.eta_s, rss_mib())

    # encoding (a 1-step run fills the cache), then one epoch (the plan's steps for this folder)
    t0 = time.monotonic()
    config = TrainConfig(steps=1, mode="full", lr=1e-4, resolution=args.resolution, batch_size=args.batch_size,
                         precision="bf16" if device.type == "cuda" else "fp32", flip=True)
    first = train(tiny_unet().to(device), folder, encode=pool_encode, vae_id="pool8", cond_for=cond_for,
                  alphas_cumprod=sd_alphas_cumprod(), prediction_type="eps", config=config, cache_dir=cache,
                  on_progress=progress, device=device)
    encode_s = time.monotonic() - t0
    n_images = len(ImageSet(folder))
    t1 = time.monotonic()
    marks.pop("train_start", None)
    result = train(tiny_unet().to(device), folder, encode=pool_encode, vae_id="pool8", cond_for=cond_for,
                   alphas_cumprod=sd_alphas_cumprod(), prediction_type="eps", config=TrainConfig(
                       **{**config.__dict__, "steps": epoch_steps(folder, config)}),
                   cache_dir=cache, on_progress=progress, device=device)
    epoch_s = time.monotonic() - t1
    if r.main:  # progress is reported on rank 0
        row = {"images": n_images, "size": args.size, "resolution": args.resolution, "batch_size": args.batch_size,
               "world": r.world, "device": str(device), "encode_s": encode_s, "encode_images_per_s": n_images / encode_s,
               "epoch_steps": result.step, "epoch_s": epoch_s,
               "train_images_per_s": (result.step - 1) * args.batch_size / max(marks["train_end"] - marks["train_start"], 1e-9),
               "rss_at_start_mib": marks["rss_at_start"], "rss_after_encoding_mib": marks.get("rss_after_cache"),
               "peak_rss_mib": peak_rss_mib(),
               "latents_in_ram_would_be_mib": n_images * 2 * 4 * (args.resolution // 8) ** 2 * 4 / 2**20,
               "first_losses": first.losses, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        name = "large_folder.json" if r.world == 1 else f"large_folder-{r.world}gpu.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(row, f, indent=1)
    if r.active:
        torch.distributed.destroy_process_group()
    return 0


def epoch_steps(folder: str, config: TrainConfig) -> int:
    """Steps in one epoch of this folder: its images per bucket (from the image headers alone)."""
    buckets, counts = make_buckets(config.resolution), {}
    for path in list_image_files(folder):
        with Image.open(path) as im:
            bucket = nearest_bucket(im.height, im.width, buckets)
        counts[bucket] = counts.get(bucket, 0) + 1
    return sum(-(-n // config.batch_size) for n in counts.values())


if __name__ == "__main__":
    sys.exit(main())
