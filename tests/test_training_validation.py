"""TrainConfig.validation_share (training/validation.py, loop.py): a share of the images held out of
training, their loss measured with fixed draws at step 0, at each checkpoint and at the end.

fp32 on CPU; the tiny UNet and fake VAE of tests/support/standins.py; eight 64x64 images (one bucket)
unless a test says otherwise.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from tests.support.standins import (CONTEXT, FakeVAE, one_cpu_thread, run, run_stopped_in_step,  # noqa: F401
                                     sd_alphas_cumprod, tiny_unet, write_image)
from training import ResumeMismatch, read_state_header
from training.data import ImageSet
from training.latents import CachedImage, LatentSet
from training.noise import q_sample
from training.plan import seeded_generator
from training.validation import DRAWS, split


def images(root, n: int = 8, sizes=((64, 64),)) -> list[str]:
    """n synthetic images in root/images (the folder `run` trains on); their names."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        write_image(folder / f"img{i}.png", w, h, seed=i)
    return sorted(os.listdir(folder))


def held_out_names(names: list[str], share: float) -> list[str]:
    data = LatentSet([CachedImage(n, (64, 64), torch.zeros(1), None) for n in names], "h", 0)
    return [im.name for im in split(data, share)[1]]


def test_the_held_out_share_depends_on_the_names_alone():
    names = [f"img{i}.png" for i in range(8)]
    assert len(held_out_names(names, 0.25)) == 2 and len(held_out_names(names, 0.01)) == 1
    assert held_out_names(names, 0.0) == []
    assert sorted(held_out_names(names, 0.25)) == sorted(held_out_names(list(reversed(names)), 0.25))
    more = held_out_names(names + ["img8.png"], 0.25)  # still 2 held out: at most one of them changes
    assert len(set(more) & set(held_out_names(names, 0.25))) >= 1
    with pytest.raises(ValueError, match=r"validation_share=0.9 holds out 4 of the 4 images and leaves none to train on"):
        split(LatentSet([CachedImage(n, (64, 64), torch.zeros(1), None) for n in names[:4]], "h", 0), 0.9)


def test_the_held_out_images_are_not_trained_on_and_measuring_them_changes_nothing(tmp_path):
    """A run holding out two of eight images trains bit for bit what a run on the other six
    trains without validation (the same plan, noise and weights)."""
    names = images(tmp_path / "a")
    held = held_out_names(names, 0.25)
    (tmp_path / "b" / "images").mkdir(parents=True)
    for name in names:
        if name not in held:
            shutil.copy(tmp_path / "a" / "images" / name, tmp_path / "b" / "images" / name)
    config = dict(steps=5, mode="full", lr=3e-3, batch_size=2, checkpoint_every=2, state_name=None)
    validated = run(tmp_path / "a", validation_share=0.25, **config)
    plain = run(tmp_path / "b", **config)
    assert validated.losses == plain.losses
    assert all(torch.equal(validated.weights[k], plain.weights[k]) for k in plain.weights)
    assert [s for s, _ in validated.validation] == [0, 2, 4, 5] and plain.validation == []


def test_the_validation_loss_is_the_held_out_images_loss_at_draws_seeded_by_their_names(tmp_path):
    """Step 0's number written out by hand: the base UNet on each held-out image (its unmirrored
    latent) at DRAWS timesteps and noises from seeded_generator("validation", name), the mean of
    their squared errors."""
    names = images(tmp_path)
    result = run(tmp_path, steps=1, validation_share=0.25, seed=3, state_name=None)
    alphas, unet, vae, losses = sd_alphas_cumprod().double(), tiny_unet(), FakeVAE(), []
    image_set = ImageSet(os.fspath(tmp_path / "images"))
    by_name = {im.name: im for im in image_set.bucketed(64)}
    for name in held_out_names(names, 0.25):
        x0 = vae(torch.from_numpy(by_name[name].pixels).float().div(255)[None])[0]
        g = seeded_generator("validation", name)
        t = torch.randint(1000, (DRAWS,), generator=g)
        eps = torch.randn((DRAWS, *x0.shape), generator=g)
        x_t = q_sample(x0.expand(DRAWS, -1, -1, -1), eps, alphas[t].float())
        with torch.no_grad():
            prediction = unet(x_t, t.float(), context=CONTEXT.expand(DRAWS, -1, -1))
        losses += (prediction - eps).square().flatten(1).mean(1).tolist()
    assert result.validation[0][0] == 0
    assert result.validation[0][1] == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_numbers_compare_across_runs_and_chunkings(tmp_path):
    """Step 0 measures the base: the same number whatever the seed, lr, mode or micro-batch (the
    same images and draws; the forward's chunk is the micro-batch)."""
    images(tmp_path)
    base = dict(steps=1, validation_share=0.25, state_name=None)
    first = run(tmp_path, batch_size=4, **base).validation[0][1]
    others = [run(tmp_path, batch_size=4, seed=7, lr=1e-2, **base).validation[0][1],
              run(tmp_path, batch_size=4, gradient_accumulation=4, **base).validation[0][1],
              run(tmp_path, batch_size=2, mode="lora", lora_rank=4, **base).validation[0][1]]
    assert others == pytest.approx([first] * 3, rel=1e-6)


def test_it_is_measured_at_the_start_every_checkpoint_and_the_end_and_recorded_in_the_state(tmp_path):
    images(tmp_path)
    reports = []
    result = run(tmp_path, steps=5, checkpoint_every=2, validation_share=0.25,
                 on_progress=lambda p: reports.append((p.step, p.loss)) if p.stage == "validation" else None)
    assert [s for s, _ in result.validation] == [0, 2, 4, 5]
    assert reports == result.validation and all(np.isfinite(v) for _, v in result.validation)
    assert list(read_state_header(tmp_path / "state.train").validation) == result.validation
    assert read_state_header(tmp_path / "state.train").config["validation_share"] == 0.25


def test_a_resumed_run_records_the_numbers_an_uninterrupted_run_does(tmp_path):
    images(tmp_path / "a")
    images(tmp_path / "b")
    config = dict(steps=7, mode="full", lr=3e-3, batch_size=2, checkpoint_every=3, ema_decay=0.9, validation_share=0.25)
    straight = run(tmp_path / "a", **config)
    run_stopped_in_step(tmp_path / "b", 5, **config)
    assert [s for s, _ in read_state_header(tmp_path / "b" / "state.train").validation] == [0, 3]
    resumed = run(tmp_path / "b", **config)
    assert resumed.start_step == 3 and resumed.validation == straight.validation  # bit for bit
    assert [s for s, _ in resumed.validation] == [0, 3, 6, 7]
    assert all(torch.equal(resumed.weights[k], straight.weights[k]) for k in straight.weights)


def test_the_validation_loss_falls_as_the_domain_is_learned(tmp_path):
    images(tmp_path, n=10)
    result = run(tmp_path, steps=30, mode="full", lr=3e-3, batch_size=4, checkpoint_every=10, validation_share=0.2,
                 state_name=None)
    losses = [v for _, v in result.validation]
    assert len(losses) == 4 and losses[-1] < 0.85 * losses[0], losses


def test_turning_validation_on_or_off_on_resume_is_refused_naming_it(tmp_path):
    images(tmp_path)
    run(tmp_path, steps=2)
    with pytest.raises(ResumeMismatch, match=r"validation_share: saved None, now 0.25"):
        run(tmp_path, steps=4, validation_share=0.25)
    with pytest.raises(ValueError, match=r"validation_share=1.0; expected a share in \[0, 1\)"):
        run(tmp_path, steps=4, validation_share=1.0)


def test_held_out_images_of_a_bucket_without_training_images_are_measured_in_it(tmp_path):
    """Two buckets; the validation forward runs per bucket with that bucket's conditioning."""
    images(tmp_path, n=6, sizes=((64, 64), (128, 64)))
    seen = []

    def cond_for(height, width):
        seen.append((height, width))
        from tests.support.standins import cond_for as plain
        return plain(height, width)

    from training import TrainConfig, train

    result = train(tiny_unet(), os.fspath(tmp_path / "images"), encode=FakeVAE(), vae_id="v", cond_for=cond_for,
                   alphas_cumprod=sd_alphas_cumprod(), prediction_type="eps", cache_dir=os.fspath(tmp_path / "cache"),
                   config=TrainConfig(steps=2, resolution=128, precision="fp32", batch_size=1, validation_share=0.5))
    assert [s for s, _ in result.validation] == [0, 2] and all(np.isfinite(v) for _, v in result.validation)
    assert len(set(seen)) == 2


def test_a_flow_model_accumulates_and_validates_as_a_discrete_one_does(tmp_path):
    """Rectified flow (its own timestep draws and target): two micro-batches train what one batch
    does, and the validation loss at step 0 is the same for both and for another seed."""
    from training import FlowSchedule, TrainConfig, train

    images(tmp_path)
    flow = FlowSchedule(sigma=lambda u: u.float(), timestep=lambda sigma: sigma * 1000, name="flow shift=1")

    def trained(**options):
        config = TrainConfig(**{**dict(steps=4, mode="full", lr=3e-3, resolution=64, precision="fp32", batch_size=4,
                                       validation_share=0.25), **options})
        return train(tiny_unet(), os.fspath(tmp_path / "images"), encode=FakeVAE(), vae_id="v", cond_for=lambda h, w: {"context": CONTEXT},
                     alphas_cumprod=None, prediction_type="flow", flow=flow, config=config, cache_dir=os.fspath(tmp_path / "cache"))

    one, parts, other_seed = trained(), trained(gradient_accumulation=2), trained(seed=5)
    assert np.allclose(parts.losses, one.losses, rtol=1e-6)
    assert all(float((parts.weights[k] - one.weights[k]).norm()) <= 1e-5 * float(one.weights[k].norm())
               for k in one.weights if not k.endswith("to_k.bias"))
    assert [s for s, _ in one.validation] == [0, 4] and one.validation[1][1] < one.validation[0][1]
    assert parts.validation[0] == one.validation[0] and other_seed.validation[0][1] == pytest.approx(one.validation[0][1], rel=1e-7)
