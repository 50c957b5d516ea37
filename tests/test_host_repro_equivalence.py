"""The reproduction's "ours" is the shipped DomainGuider: the same samples in the real host.

experiments/indomain_repro.py samples "ours" with its own DDIM loop and guided_predictor (the pack's
guidance functions on the small UNet's v predictions). Here the same small networks are wrapped as
host models (a BaseModel of v-prediction on the experiment's cosine schedule, the class as a
one-number conditioning), and the pack's DomainGuider samples them inside the host, from the same
noise and on the same sigmas:

* with the host's own Euler sampler against the experiment's DDIM without its x0 clamp (deterministic
  DDIM is Euler in the host's sigma space);
* with the clamp (the experiment as it runs) against DomainGuider with a host sampler that clamps each
  step's denoised image to [-1, 1] and takes the same Euler step;
* the domain term on part of the run (the nodes' domain_start / domain_end against the experiment's
  interval rows) and the speed dial domain_every.

Samples agree to float32 rounding: at most 5e-3, on average 5e-4, on images in [-1, 1] (measured:
2e-3 and 1.4e-4). Each step's denoised image agrees to about 1e-5; the rest is the host's float32 Euler
step out of the cosine schedule's sigma_max (about 2e4: the latent is 2e4 times the noise there, and
float32 keeps it to about 1e-3). A 5 % change of the domain weight on either side, an interval or the
speed dial moves the samples by more than 0.1, twenty times the tolerance, so the comparison can fail.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from experiments.indomain_repro import (CONFIGS, cosine_alphas_cumprod, ddim_sample, guided_predictor, host_sigmas,
                                        sampling_timesteps)
from experiments.unet import SmallUNet

CFG, WEIGHT, STEPS, N, SIZE = 7.5, 1.5, 10, 2, 16
CLASS = 2
MAX_DIFF, MEAN_DIFF = 5e-3, 5e-4  # float32 rounding (module docstring)
DIFFERENT = 0.1  # what a change of the method does, at least


def assert_same(host, ours):
    diff = (host - ours).abs()
    assert diff.max() < MAX_DIFF and diff.mean() < MEAN_DIFF, (float(diff.max()), float(diff.mean()))


def assert_different(a, b):
    assert (a - b).abs().max() > DIFFERENT, float((a - b).abs().max())


def small_unet(seed: int) -> SmallUNet:
    """A small UNet with seeded random weights (its output layer too, which training starts at zero)."""
    torch.manual_seed(seed)
    net = SmallUNet(3, (8, 16), 4, 16, 2)
    with torch.no_grad():
        net.out.weight.normal_(0, 0.05)
        net.out.bias.normal_(0, 0.05)
    return net.eval()


class HostUNet(torch.nn.Module):
    """The host's diffusion_model call (x, t, context=...) on a SmallUNet: the class is context[:, 0, 0]."""

    def __init__(self, net: SmallUNet):
        super().__init__()
        self.net = net
        self.dtype = torch.float32  # (the host reads its diffusion model's dtype)

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        return self.net(x, timesteps, context[:, 0, 0].round().long())


def small_config_class():
    """The host model config of the small UNet (one class for every model: one family)."""
    from comfy import latent_formats, supported_models_base

    class SmallConfig(supported_models_base.BASE):
        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}
        latent_format = latent_formats.LatentFormat  # scale 1: the latent is the image

    return SmallConfig


def host_model(net: SmallUNet, alphas_cumprod, config_class):
    """The network as a host MODEL: v prediction, the schedule's sigmas, float32 on the CPU."""
    from comfy import model_base
    from comfy.model_patcher import ModelPatcher

    config = config_class({"disable_unet_model_creation": True, "small_unet": [8, 16]})
    config.set_inference_dtype(torch.float32, None)
    model = model_base.BaseModel(config, model_type=model_base.ModelType.V_PREDICTION, device="cpu")
    model.diffusion_model = HostUNet(net)
    model.model_sampling.set_sigmas(host_sigmas(alphas_cumprod))
    return ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def label(k: float):
    return [[torch.full((1, 1, 1), float(k)), {}]]


@pytest.fixture(scope="module")
def setup(comfy):
    ac = cosine_alphas_cumprod(1000)
    base, domain = small_unet(0), small_unet(1)
    cfg = dataclasses.replace(CONFIGS["cpu"], sample_steps=STEPS, size=SIZE)
    config = small_config_class()
    return {"ac": ac, "base": base, "domain": domain, "cfg": cfg,
            "experiment": {},  # (weight, clamp, interval, every) -> samples
            "base_model": host_model(base, ac, config), "domain_model": host_model(domain, ac, config)}


def clamped_euler():
    """A host sampler: the host's Euler step on each step's denoised image clamped to [-1, 1]."""
    from comfy.samplers import KSAMPLER

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **(extra_args or {})).clamp(-1, 1)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    return KSAMPLER(sample)


def through_the_guider(comfy, setup, sampler, weight=WEIGHT, start=0.0, end=1.0, every=1):
    """DomainGuider (the pack's, as the nodes build it) on the host models, from the experiment's noise."""
    DomainGuider = comfy.pack("nodes.sampling.guider").DomainGuider
    DomainTerm = comfy.pack("nodes.sampling.domains").DomainTerm
    noise = torch.randn((N, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7))  # ddim_sample's, seed 7
    ms = setup["base_model"].model.model_sampling
    ts = sampling_timesteps(1000, STEPS)
    sigmas = torch.cat([ms.sigmas[ts], ms.sigmas.new_zeros(1)])
    guider = DomainGuider(setup["base_model"], [DomainTerm(setup["domain_model"], weight, start, end, name="domain_model")],
                          domain_every=every)
    null = label(4)  # the null class: the empty prompt, also the negative (n = u, as in the experiment)
    guider.set_conds(label(CLASS), null, null)
    guider.set_cfg(CFG)
    return guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, seed=7, disable_pbar=True)


def through_the_experiment(setup, weight=WEIGHT, clamp=True, interval=None, every=1):
    key = (weight, clamp, interval, every)
    if key not in setup["experiment"]:
        setup["experiment"][key] = _experiment(setup, *key)
    return setup["experiment"][key]


def _experiment(setup, weight, clamp, interval, every):
    pred = guided_predictor(setup["base"], setup["domain"], CFG, weight, every, STEPS, interval=interval,
                            alphas_cumprod=setup["ac"])
    return ddim_sample(pred, torch.full((N,), CLASS), setup["cfg"], setup["ac"], 7, "cpu", clamp=clamp)


def test_ours_is_the_domain_guider_with_the_hosts_euler_sampler(comfy, setup):
    from comfy.samplers import sampler_object

    host = through_the_guider(comfy, setup, sampler_object("euler"))
    ours = through_the_experiment(setup, clamp=False)
    assert_same(host, ours)
    assert ours.abs().max() > 0.5  # real images, not zeros


def test_ours_as_the_experiment_runs_it_is_the_domain_guider(comfy, setup):
    """The experiment's clamped DDIM against DomainGuider with a sampler that clamps the same way."""
    host = through_the_guider(comfy, setup, clamped_euler())
    ours = through_the_experiment(setup)
    assert_same(host, ours)
    # either side with another weight is far off: the comparison can fail
    assert_different(through_the_experiment(setup, weight=WEIGHT * 1.05), host)
    assert_different(through_the_guider(comfy, setup, clamped_euler(), weight=WEIGHT * 1.05), ours)


@pytest.mark.parametrize("start,end", [(0.0, 0.5), (0.5, 1.0)])  # the table's rows
def test_the_domain_term_on_part_of_the_run_is_the_guiders_domain_start_and_end(comfy, setup, start, end):
    host = through_the_guider(comfy, setup, clamped_euler(), start=start, end=end)
    ours = through_the_experiment(setup, interval=(start, end))
    assert_same(host, ours)
    whole = through_the_experiment(setup)
    assert_different(whole, ours)  # the interval did switch the term off somewhere


def test_the_speed_dial_is_the_guiders_domain_every(comfy, setup):
    host = through_the_guider(comfy, setup, clamped_euler(), every=3)
    ours = through_the_experiment(setup, every=3)
    assert_same(host, ours)
    assert_different(through_the_experiment(setup), ours)

