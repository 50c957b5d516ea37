"""training/data.py: which files are training images, buckets, and what happens to bad input."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.standins import write_image
from training.data import ImageSet, fit_to_bucket, make_buckets, nearest_bucket


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_buckets_are_multiples_of_64_within_the_area_up_to_2_to_1(resolution):
    buckets = make_buckets(resolution)
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert h * w <= resolution**2
        assert max(h / w, w / h) <= 2.0
    assert (resolution, resolution) in buckets
    assert {(h, w) for h, w in buckets} == {(w, h) for h, w in buckets}  # portrait and landscape alike
    assert min(w / h for h, w in buckets) == 0.5 and max(w / h for h, w in buckets) == 2.0


def test_bucket_of_512_listed():
    assert make_buckets(512) == [(640, 320), (640, 384), (576, 448), (512, 512), (448, 576), (384, 640), (320, 640)]


def test_resolution_not_a_multiple_of_64_is_refused():
    with pytest.raises(ValueError, match="resolution=500"):
        make_buckets(500)


def test_mixed_sizes_go_to_the_nearest_bucket_and_come_out_at_its_size(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "a_tall_tiny.png", 37, 91)  # w x h: 1:2.46, tiny -> upscaled
    write_image(folder / "b_wide.jpg", 600, 300)  # 2:1
    write_image(folder / "c_square.webp", 300, 310)
    out = {im.name: im for im in ImageSet(folder).bucketed(512)}
    assert out["a_tall_tiny.png"].bucket == (640, 320)
    assert out["b_wide.jpg"].bucket == (320, 640)
    assert out["c_square.webp"].bucket == (512, 512)
    for im in out.values():
        assert im.pixels.shape == (*im.bucket, 3) and im.pixels.dtype == np.uint8


def test_nearest_bucket_compares_aspect_ratios():
    buckets = make_buckets(512)
    assert nearest_bucket(91, 37, buckets) == (640, 320)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(100, 170, buckets) == (384, 640)  # 1.7 -> 1.67


def test_cover_and_centre_crop_keeps_the_middle():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255  # a white middle third
    out = fit_to_bucket(Image.fromarray(image), (64, 64))  # square crop of the middle
    assert out.shape == (64, 64, 3) and out.mean() > 250


def test_files_are_images_by_extension_any_case_sorted(tmp_path):
    for name in ("b.PNG", "a.JpG", "c.jpeg", "d.bmp", "e.webp"):
        write_image(tmp_path / name, 64, 64)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder, not a file
    assert ImageSet(tmp_path).names == ["a.JpG", "b.PNG", "c.jpeg", "d.bmp", "e.webp"]


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 200x100 landscape shows as portrait
    Image.fromarray(np.full((100, 200, 3), 128, np.uint8)).save(tmp_path / "rot.jpg", exif=exif)
    (im,) = ImageSet(tmp_path).bucketed(512)
    assert im.bucket == (640, 320)


def test_corrupt_files_are_skipped_with_one_warning_listing_them(tmp_path, caplog):
    write_image(tmp_path / "good.png", 64, 64)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        out = list(ImageSet(tmp_path).bucketed(64))
    assert [im.name for im in out] == ["good.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "broken.png" in warnings[0].getMessage() and "empty.jpg" in warnings[0].getMessage()


def test_all_files_corrupt_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=f"none of the 1 image file.*{tmp_path.name}"):
        list(ImageSet(tmp_path).bucketed(64))


def test_missing_empty_or_file_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="missing_dir' does not exist"):
        ImageSet(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty'.* has no image files"):
        ImageSet(tmp_path / "empty")
    file = write_image(tmp_path / "one.png", 8, 8)
    with pytest.raises(ValueError, match=r"one.png'.* is a file, not a folder"):
        ImageSet(file)


def test_an_image_batch_is_accepted_like_a_folder():
    batch = torch.rand(2, 300, 600, 3)
    out = list(ImageSet(batch).bucketed(512))
    assert [im.name for im in out] == ["images[0]", "images[1]"]
    assert all(im.bucket == (320, 640) for im in out)
    small = torch.full((1, 64, 64, 3), 0.5)
    (im,) = ImageSet(small).bucketed(64)
    assert im.pixels.shape == (64, 64, 3) and (im.pixels == 128).all()


def test_a_batch_of_the_wrong_shape_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"images: expected an IMAGE batch shaped \[B, H, W, 3\].*\[2, 3, 64, 64\]"):
        ImageSet(torch.rand(2, 3, 64, 64))
