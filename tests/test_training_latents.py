"""training/latents.py: each bucketed image is encoded once, ever; a bad cache file is re-encoded."""
import logging
import os

import torch

from test_training_support import FakeVAE, image_folder
from training.data import ImageSet, flip_horizontal
from training.latents import CACHE_EXTENSION, cache_latents, to_image_batch


def _cache(folder, cache_dir, vae, vae_id="vae-1", flip=False):
    return cache_latents(ImageSet(folder).bucketed(64), encode=vae, vae_id=vae_id, cache_dir=cache_dir, flip=flip)


def test_second_run_reads_every_latent_from_the_cache(tmp_path):
    folder, cache = image_folder(tmp_path, n=3), tmp_path / "cache"
    first_vae, second_vae = FakeVAE(), FakeVAE()
    first = _cache(folder, cache, first_vae)
    second = _cache(folder, cache, second_vae)
    assert first_vae.calls == 3 and first.encoded == 3
    assert second_vae.calls == 0 and second.encoded == 0
    for a, b in zip(first.images, second.images):
        assert torch.equal(a.latent, b.latent) and a.latent.shape == (4, 8, 8)
    assert first.image_set == second.image_set


def test_cache_files_are_not_safetensors_named(tmp_path):
    _cache(image_folder(tmp_path, n=2), tmp_path / "cache", FakeVAE())
    names = os.listdir(tmp_path / "cache")
    assert len(names) == 2 and all(n.endswith(CACHE_EXTENSION) and ".safetensors" not in n for n in names)


def test_the_cache_key_is_the_pixels_not_the_file_name(tmp_path):
    folder, cache = image_folder(tmp_path, n=2), tmp_path / "cache"
    _cache(folder, cache, FakeVAE())
    os.rename(os.path.join(folder, "img0.png"), os.path.join(folder, "renamed.png"))
    vae = FakeVAE()
    _cache(folder, cache, vae)
    assert vae.calls == 0


def test_another_vae_encodes_again(tmp_path):
    folder, cache = image_folder(tmp_path, n=2), tmp_path / "cache"
    _cache(folder, cache, FakeVAE(), vae_id="vae-1")
    vae = FakeVAE()
    _cache(folder, cache, vae, vae_id="vae-2")
    assert vae.calls == 2 and len(os.listdir(cache)) == 4


def test_a_corrupt_cache_file_is_re_encoded_with_a_warning(tmp_path, caplog):
    folder, cache = image_folder(tmp_path, n=2), tmp_path / "cache"
    reference = _cache(folder, cache, FakeVAE())
    victim = sorted(os.listdir(cache))[0]
    with open(cache / victim, "r+b") as f:  # truncate it mid-file
        f.truncate(20)
    vae = FakeVAE()
    with caplog.at_level(logging.WARNING, logger="training.latents"):
        again = _cache(folder, cache, vae)
    assert vae.calls == 1
    assert any(victim in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    for a, b in zip(reference.images, again.images):
        assert torch.equal(a.latent, b.latent)
    assert _cache(folder, cache, FakeVAE()).encoded == 0  # the file was repaired


def test_flip_caches_the_mirror_images_latent_too(tmp_path):
    folder, cache = image_folder(tmp_path, n=2), tmp_path / "cache"
    vae = FakeVAE()
    out = _cache(folder, cache, vae, flip=True)
    assert vae.calls == 4
    (first, *_) = ImageSet(folder).bucketed(64)
    assert torch.equal(out.images[0].flipped, FakeVAE()(to_image_batch(flip_horizontal(first.pixels)))[0])
    assert not torch.equal(out.images[0].flipped, out.images[0].latent)
