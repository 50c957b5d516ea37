"""training/latents.py: each bucketed image is encoded once, ever; a bad cache file is re-encoded."""
import logging
import os

import numpy as np
import torch

from tests.support.standins import FakeVAE, image_folder
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


def test_the_latents_stay_on_disk_and_give_the_batches_the_in_memory_cache_gave(tmp_path):
    """The LatentSet holds file paths, not tensors; sampling from it gives, step for step, the
    batches that the same latents held in memory (CachedImage, the cache before issue 20) give."""
    from training import TrainConfig
    from training.latents import CachedImage, LatentFile, LatentSet
    from training.plan import sample_batch
    from tests.support.standins import write_image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        write_image(folder / f"square{i}.png", 128, 128, seed=i)
        write_image(folder / f"wide{i}.png", 192, 96, seed=10 + i)
    lazy = cache_latents(ImageSet(os.fspath(folder)).bucketed(128), encode=FakeVAE(), vae_id="v", cache_dir=tmp_path / "cache", flip=True)
    assert all(isinstance(im, LatentFile) for im in lazy.images)
    in_memory = LatentSet([CachedImage(im.name, im.bucket, im.latent, im.flipped) for im in lazy.images], lazy.image_set, 0)
    config = TrainConfig(batch_size=3, seed=7)
    for step in range(1, 16):  # more than one epoch (two buckets of 5: 4 batches an epoch)
        a, b = sample_batch(lazy, step, config, 1000), sample_batch(in_memory, step, config, 1000)
        assert a.bucket == b.bucket and torch.equal(a.x0, b.x0) and torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_encoding_a_large_folder_keeps_memory_bounded(tmp_path):
    """160 images whose latents are 1 MiB each (160 MiB if they were kept in RAM, as before issue
    20): the resident memory grows by far less. bench/large_folder.py measures 20,000 images."""
    from training.data import BucketedImage

    def big_latent(images):  # [1, 4, 256, 256] float32 = 1 MiB from a 64 px image
        return torch.nn.functional.interpolate(FakeVAE()(images), size=(256, 256))

    def pictures():
        for i in range(160):
            pixels = np.full((64, 64, 3), i, dtype=np.uint8)
            yield BucketedImage(f"im{i}", pixels, i)

    before = _rss_mib()
    data = cache_latents(pictures(), encode=big_latent, vae_id="big", cache_dir=tmp_path / "cache", flip=False)
    grown = _rss_mib() - before
    assert data.encoded == 160 and data.images[-1].latent.shape == (4, 256, 256)
    assert grown < 40, f"resident memory grew by {grown:.0f} MiB while encoding 160 MiB of latents"


def test_a_second_run_reads_no_unchanged_image_file_and_trains_on_the_same_set(tmp_path, monkeypatch):
    """The file index (training.latents.FileIndex): a run over the same folder, resolution, flip
    setting and VAE reads none of the unchanged image files again (a large folder's runs otherwise
    decode every image to find its cache entry), with the same latents, buckets and set digest; an
    image rewritten since is read and encoded again, and an unreadable index only costs the reads."""
    import training.data as data
    from tests.support.standins import cond_for, sd_alphas_cumprod, tiny_unet, write_image
    from training import TrainConfig, train

    folder, cache = image_folder(tmp_path, n=4), tmp_path / "cache"
    reads = []
    real = data.read_image
    monkeypatch.setattr(data, "read_image", lambda path: reads.append(os.path.basename(path)) or real(path))

    def run(vae):
        return train(tiny_unet(), folder, encode=vae, vae_id="vae-1", cond_for=cond_for, alphas_cumprod=sd_alphas_cumprod(),
                     prediction_type="eps", config=TrainConfig(steps=1, mode="full", resolution=64, precision="fp32",
                                                               batch_size=2), cache_dir=os.fspath(cache))

    first_vae = FakeVAE()
    first = run(first_vae)
    assert sorted(reads) == [f"img{i}.png" for i in range(4)] and first_vae.calls == 8  # each image and its mirror
    reads.clear()
    second_vae = FakeVAE()
    second = run(second_vae)
    assert reads == [] and second_vae.calls == 0
    assert second.losses == first.losses and all(torch.equal(first.weights[k], v) for k, v in second.weights.items())

    write_image(tmp_path / "images" / "img2.png", 64, 64, seed=99)  # rewritten: other pixels
    os.utime(tmp_path / "images" / "img2.png", ns=(1, 1))  # whatever the clock says
    reads.clear()
    third_vae = FakeVAE()
    run(third_vae)
    assert reads == ["img2.png"] and third_vae.calls == 2

    index = next(p for p in os.listdir(cache) if p.startswith("files-"))
    (cache / index).write_text("{not json")
    reads.clear()
    fourth_vae = FakeVAE()
    run(fourth_vae)
    assert sorted(reads) == [f"img{i}.png" for i in range(4)] and fourth_vae.calls == 0  # read, not encoded


def test_an_image_changed_while_a_run_reads_it_is_read_again_by_the_next_run(tmp_path, monkeypatch):
    """The index records each file as it was before it was read: a file rewritten during a run (here
    its modification time changes right after it is read) no longer matches, so the next run reads
    it again instead of training on the latents of its old content."""
    import training.data as data
    from training.latents import FileIndex

    folder, cache = image_folder(tmp_path, n=3), tmp_path / "cache"
    real = data.read_image

    def read_then_touch(path):
        image = real(path)
        if path.endswith("img1.png"):
            os.utime(path, ns=(5, 5))
        return image

    def run():
        index = FileIndex(cache, "vae-1", 64, False)
        images = cache_latents(ImageSet(folder).bucketed(64, known=lambda i, sig: index.known(f"img{i}", i, sig)),
                               encode=FakeVAE(), vae_id="vae-1", cache_dir=cache, flip=False).images
        index.save(images)
        return images

    monkeypatch.setattr(data, "read_image", read_then_touch)
    run()
    reads = []
    monkeypatch.setattr(data, "read_image", lambda path: reads.append(os.path.basename(path)) or real(path))
    run()
    assert reads == ["img1.png"]
