"""training/noise.py: DDPM's forward process and the eps / v targets, per sample."""
import pytest
import torch

from tests.support.standins import sd_alphas_cumprod
from training.noise import check_schedule, denoising_loss, prediction_target, q_sample, v_target

g = torch.Generator().manual_seed(0)
x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
a = torch.tensor([0.99, 0.5, 0.01])


def test_q_sample_is_ddpm_eq_4_per_sample():
    x_t = q_sample(x0, eps, a)
    for i in range(3):
        assert torch.allclose(x_t[i], a[i].sqrt() * x0[i] + (1 - a[i]).sqrt() * eps[i])
    assert torch.equal(q_sample(x0, eps, torch.ones(3)), x0)


def test_v_target_is_salimans_ho_velocity():
    v = v_target(x0, eps, a)
    assert torch.allclose(v[1], a[1].sqrt() * eps[1] - (1 - a[1]).sqrt() * x0[1])
    # v-parametrisation identities: x0 = sqrt(a) x_t - sqrt(1-a) v, eps = sqrt(1-a) x_t + sqrt(a) v
    x_t, s, c = q_sample(x0, eps, a), a.sqrt()[:, None, None, None], (1 - a).sqrt()[:, None, None, None]
    assert torch.allclose(s * x_t - c * v, x0, atol=1e-5)
    assert torch.allclose(c * x_t + s * v, eps, atol=1e-5)


def test_targets_by_prediction_type():
    assert torch.equal(prediction_target(x0, eps, a, "eps"), eps)
    assert torch.equal(prediction_target(x0, eps, a, "v"), v_target(x0, eps, a))
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        prediction_target(x0, eps, a, "x0")


def test_loss_is_the_mean_squared_error_in_float32():
    pred = eps.to(torch.bfloat16)
    loss = denoising_loss(pred, eps)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, ((pred.float() - eps) ** 2).mean())


def test_schedule_checks_name_the_input():
    check_schedule(sd_alphas_cumprod(), "v")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        check_schedule(torch.ones(10, 10), "eps")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        check_schedule(torch.tensor([1.5, 0.5]), "eps")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        check_schedule(sd_alphas_cumprod(), "epsilon")


def test_a_zero_terminal_snr_step_is_pure_noise_and_its_v_target_is_minus_x0():
    """Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are
    Flawed") ends the schedule at alpha_bar = 0: x_t is the noise alone and v = -x0, a finite
    target (eps would be unlearnable there, which is why zsnr goes with v-prediction)."""
    zsnr = torch.cat([sd_alphas_cumprod()[:-1], torch.zeros(1)])
    check_schedule(zsnr, "v")
    zero = torch.zeros(3)
    assert torch.equal(q_sample(x0, eps, zero), eps)
    assert torch.equal(v_target(x0, eps, zero), -x0)
