"""Exact-oracle tests of guidance/: decoupled guidance on data whose denoisers are closed form.

Every distribution here is a mixture of isotropic Gaussians in 2-D. Under the noising
x = x0 + sigma * eps the noisy marginal is again such a mixture (variances s_j^2 + sigma^2), so
the optimal denoiser E[x0 | x] is exact: the responsibility-weighted posterior means
mu_j + s_j^2 / (s_j^2 + sigma^2) * (x - mu_j). Three "models" are such oracles:

    base, class k      p_k          (each class is itself a small mixture)
    base, empty prompt p = sum_k pi_k p_k
    domain, empty      q            (another mixture, away from the base classes)

Samples come from a deterministic probability-flow ODE sampler (Heun in sigma, Karras
schedule, sigma_max large enough that starting from N(0, sigma_max^2) is unbiased at this
sample size) that feeds decoupled_guidance the x0 predictions of the oracles at every step.

Pure tests: no host fixture, tiny float64 tensors, run single-threaded (a module fixture sets
torch's thread count to 1 and restores it: threads only add overhead at this size). The whole
file takes seconds.

Statistics are judged by z-scores: (estimate - truth) / standard error, the standard error
derived from the sample size. A correct sampler gives |z| of order 1; the tests accept
|z| < Z_MAX = 5 for every statistic and show, with deliberately wrong weights, that the same
check rejects a wrong distribution by a wide margin.
"""
from __future__ import annotations

import math

import pytest
import torch

from guidance import GuidanceTerm, decoupled_guidance

DT = torch.float64
N_PARTICLES = 4_000  # statistical tests
N_EXACT = 256  # bit-for-bit / formula tests: the trajectories, not the statistics, are compared
N_STEPS = 60
SIGMA_MIN, SIGMA_MAX = 0.002, 2000.0
Z_MAX = 5.0


class IsoMixture:
    """sum_j w_j N(mu_j, s_j^2 I) in 2-D, with its exact denoiser and moments."""

    def __init__(self, weights, means, stds):
        self.w = torch.tensor(weights, dtype=DT)
        self.w = self.w / self.w.sum()
        self.mu = torch.tensor(means, dtype=DT)
        self.s = torch.tensor(stds, dtype=DT)

    @staticmethod
    def combine(parts, weights):
        out = IsoMixture([1.0], [[0.0, 0.0]], [1.0])
        out.w = torch.cat([p.w * w for p, w in zip(parts, weights)])
        out.w = out.w / out.w.sum()
        out.mu = torch.cat([p.mu for p in parts])
        out.s = torch.cat([p.s for p in parts])
        return out

    def mean(self) -> torch.Tensor:
        return (self.w[:, None] * self.mu).sum(0)

    def cov(self) -> torch.Tensor:
        m = self.mean()
        d = self.mu - m
        within = (self.w * self.s**2).sum() * torch.eye(2, dtype=DT)
        return within + (self.w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        j = torch.multinomial(self.w, n, replacement=True, generator=g)
        return self.mu[j] + self.s[j, None] * torch.randn(n, 2, generator=g, dtype=DT)

    def responsibilities(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        var = self.s**2 + sigma**2  # [J]
        sq = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)  # [N, J]
        logits = torch.log(self.w) - torch.log(var) - sq / (2 * var)  # 2-D: -d/2 log var = -log var
        return torch.softmax(logits, dim=1)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """E[x0 | x0 + sigma * eps = x], exactly."""
        r = self.responsibilities(x, sigma)
        shrink = self.s**2 / (self.s**2 + sigma**2)  # [J]
        post = self.mu[None] + shrink[None, :, None] * (x[:, None, :] - self.mu[None])  # [N, J, 2]
        return (r[:, :, None] * post).sum(1)


# base model: three classes, each a small mixture; class prior PI
CLASS_MIX = [
    IsoMixture([0.5, 0.5], [[-4.0, 0.0], [-4.0, 3.0]], [0.6, 0.6]),
    IsoMixture([1.0], [[4.0, 0.0]], [0.8]),
    IsoMixture([0.7, 0.3], [[0.0, 4.0], [1.0, -4.0]], [0.5, 0.5]),
]
PI = [0.5, 0.3, 0.2]
BASE = IsoMixture.combine(CLASS_MIX, PI)
# domain model: text-free, a different mixture
DOMAIN = IsoMixture([0.6, 0.4], [[0.0, 0.0], [2.5, 2.0]], [1.0, 0.4])


def karras_sigmas(n: int = N_STEPS, smin: float = SIGMA_MIN, smax: float = SIGMA_MAX, rho: float = 7.0):
    ramp = torch.linspace(0, 1, n, dtype=DT)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=DT)]).tolist()


def as_latent(x: torch.Tensor) -> torch.Tensor:
    """[N, 2] -> [N, 2, 1, 1]: the [B, C, H, W] layout that guidance/ documents."""
    return x[:, :, None, None]


def oracle_predictions(x, sigma, cls, negative):
    """u, c, n and d: the x0 predictions of the oracle "models" at x, as [N, 2, 1, 1].

    negative: None (the empty prompt), an int class, or an IsoMixture.
    """
    u = BASE.denoise(x, sigma)
    c = CLASS_MIX[cls].denoise(x, sigma)
    if negative is None:
        n = None
    elif isinstance(negative, int):
        n = CLASS_MIX[negative].denoise(x, sigma)
    else:
        n = negative.denoise(x, sigma)
    d = DOMAIN.denoise(x, sigma)
    return as_latent(u), as_latent(c), None if n is None else as_latent(n), as_latent(d)


def start_noise(seed: int = 0, n: int = N_PARTICLES) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=DT)


def pf_ode(guided_x0, x: torch.Tensor, sigmas=None) -> torch.Tensor:
    """Probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, Heun steps (Karras et al.
    2022, alg. 1); the last one, to sigma 0, is an Euler step and returns D itself."""
    sigmas = karras_sigmas() if sigmas is None else sigmas
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - guided_x0(x, s).reshape(x.shape)) / s
        x_euler = x + (s_next - s) * slope
        if s_next == 0:
            x = x_euler
        else:
            slope_next = (x_euler - guided_x0(x_euler, s_next).reshape(x.shape)) / s_next
            x = x + (s_next - s) * (slope + slope_next) / 2
    return x


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample_decoupled(cls, negative, cfg, domain_weight, seed=0, domain=None, n=N_PARTICLES):
    """ODE samples under decoupled_guidance with the oracles (domain model DOMAIN unless given).

    domain_weight: one weight for the domain model, or a list of (model, weight) pairs: several
    domain terms at once.
    """
    dom = DOMAIN if domain is None else domain
    pairs = domain_weight if isinstance(domain_weight, list) else [(dom, domain_weight)]

    def guided(x, s):
        u, c, n_, _ = oracle_predictions(x, s, cls, negative)
        terms = [GuidanceTerm(as_latent(model.denoise(x, s)), w) for model, w in pairs]
        return decoupled_guidance(u, c, n_, cfg, terms=terms)

    return pf_ode(guided, start_noise(seed, n))


def moment_z_scores(samples: torch.Tensor, target: IsoMixture) -> dict[str, float]:
    """z-scores of the sample mean and covariance against the target's exact moments.

    Standard errors: sqrt(Sigma_ii / N) for mean i; for covariance entry ij the sample standard
    deviation of (x_i - m_i)(x_j - m_j), over sqrt(N).
    """
    n = samples.shape[0]
    m, cov = target.mean(), target.cov()
    z = {}
    mhat = samples.mean(0)
    for i in range(2):
        z[f"mean[{i}]"] = float((mhat[i] - m[i]) / torch.sqrt(cov[i, i] / n))
    dev = samples - mhat
    for i, j in ((0, 0), (1, 1), (0, 1)):
        prod = dev[:, i] * dev[:, j]
        z[f"cov[{i}{j}]"] = float((prod.mean() - cov[i, j]) / (prod.std() / math.sqrt(n)))
    return z


def occupancy_z_scores(samples: torch.Tensor, target: IsoMixture, seed: int = 123) -> dict[str, float]:
    """Two-sample z-scores of the fraction of points that each target component claims
    (largest responsibility at sigma 0), ODE samples against as many direct samples."""
    direct = target.sample(samples.shape[0], torch.Generator().manual_seed(seed))
    j = len(target.w)
    a = torch.bincount(target.responsibilities(samples, 0.0).argmax(1), minlength=j).to(DT) / samples.shape[0]
    b = torch.bincount(target.responsibilities(direct, 0.0).argmax(1), minlength=j).to(DT) / direct.shape[0]
    p = (a + b) / 2
    se = torch.sqrt(p * (1 - p) * 2 / samples.shape[0]).clamp_min(1e-12)
    return {f"occupancy[{i}]": float((a[i] - b[i]) / se[i]) for i in range(j)}


def worst_z(samples: torch.Tensor, target: IsoMixture) -> tuple[str, float]:
    z = {**moment_z_scores(samples, target), **occupancy_z_scores(samples, target)}
    name = max(z, key=lambda k: abs(z[k]))
    return name, abs(z[name])


# ------------------------------------------------------------------------------------------
# the sampler and the checks themselves


def test_oracle_sampler_reproduces_the_base_distribution():
    """Unguided (cfg 1 on the empty prompt is u itself) sampling gives the base mixture:
    the ODE, its schedule and the z-test are sound before any guidance is involved."""
    x = pf_ode(lambda x, s: BASE.denoise(x, s), start_noise())
    name, z = worst_z(x, BASE)
    assert z < Z_MAX, f"{name}: |z| = {z:.2f}"


def test_z_test_detects_a_different_distribution():
    """The moment/occupancy check has power: direct samples of class 0 are not the base."""
    x = CLASS_MIX[0].sample(N_PARTICLES, torch.Generator().manual_seed(1))
    assert worst_z(x, BASE)[1] > 10 * Z_MAX


# ------------------------------------------------------------------------------------------
# (a) a domain model equal to the base changes nothing


@pytest.mark.parametrize("cfg", [1.0, 4.0])
@pytest.mark.parametrize("negative", [None, 2])
@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_a_domain_equal_to_base_gives_plain_cfg_exactly(cfg, negative, weight):
    """d = u (the domain model is a copy of the base): any domain weight leaves KSampler's CFG
    trajectory unchanged, bit for bit."""

    def ksampler(x, s):
        u, c, n, _ = oracle_predictions(x, s, 0, negative)
        n = u if n is None else n
        return n + (c - n) * cfg  # comfy/samplers.py cfg_function

    plain = pf_ode(ksampler, start_noise(n=N_EXACT))
    ours = sample_decoupled(0, negative, cfg, weight, domain=BASE, n=N_EXACT)
    assert torch.equal(ours, plain)


# ------------------------------------------------------------------------------------------
# (b) cfg 0, domain weight 1: the domain distribution


def test_b_cfg0_domain_weight1_samples_the_domain():
    x = sample_decoupled(cls=0, negative=None, cfg=0.0, domain_weight=1.0)
    name, z = worst_z(x, DOMAIN)
    assert z < Z_MAX, f"{name}: |z| = {z:.2f}"


@pytest.mark.parametrize("weight", [0.5, 0.8, 1.5])
def test_b_wrong_domain_weight_is_detected(weight):
    """The same check fails for a wrong domain weight: the test of (b) can fail."""
    x = sample_decoupled(cls=0, negative=None, cfg=0.0, domain_weight=weight)
    name, z = worst_z(x, DOMAIN)
    assert z > 2 * Z_MAX, f"weight {weight} passed as the domain: worst {name} |z| = {z:.2f}"


# ------------------------------------------------------------------------------------------
# (c) cfg 1, domain weight 0, empty negative: the class-conditional distribution


@pytest.mark.parametrize("cls", [0, 1, 2])
def test_c_cfg1_no_domain_samples_the_class(cls):
    x = sample_decoupled(cls=cls, negative=None, cfg=1.0, domain_weight=0.0)
    name, z = worst_z(x, CLASS_MIX[cls])
    assert z < Z_MAX, f"class {cls}, {name}: |z| = {z:.2f}"


@pytest.mark.parametrize("cfg, weight", [(1.0, 0.3), (2.0, 0.0)])
def test_c_wrong_weights_are_detected(cfg, weight):
    """A domain weight of 0.3, or cfg 2, no longer samples class 0: the check says so."""
    x = sample_decoupled(cls=0, negative=None, cfg=cfg, domain_weight=weight)
    name, z = worst_z(x, CLASS_MIX[0])
    assert z > 2 * Z_MAX, f"cfg {cfg}, w {weight} passed as class 0: worst {name} |z| = {z:.2f}"


# ------------------------------------------------------------------------------------------
# (d) domain weight 0: KSampler's CFG bit for bit, whatever the negative


NEGATIVES = {"empty": None, "class 1": 1, "class 2": 2, "the domain": DOMAIN}


@pytest.mark.parametrize("negative", list(NEGATIVES), ids=list(NEGATIVES))
@pytest.mark.parametrize("cfg", [0.0, 1.0, 2.5, 7.0])
def test_d_zero_domain_weight_is_ksampler_cfg_bit_for_bit(negative, cfg):
    neg = NEGATIVES[negative]
    steps = []

    def ksampler(x, s):
        u, c, n, _ = oracle_predictions(x, s, 0, neg)
        n = u if n is None else n
        return n + (c - n) * cfg  # comfy/samplers.py cfg_function: uncond + (cond - uncond) * scale

    def ours(x, s):
        u, c, n, d = oracle_predictions(x, s, 0, neg)
        out = decoupled_guidance(u, c, n, cfg, terms=[GuidanceTerm(d, 0.0)])
        steps.append(torch.equal(out, ksampler(x, s)))
        return out

    ours_x = pf_ode(ours, start_noise(n=N_EXACT))
    assert all(steps) and len(steps) == 2 * N_STEPS - 1  # Heun: two evaluations a step, one in the last
    assert torch.equal(ours_x, pf_ode(ksampler, start_noise(n=N_EXACT)))


# ------------------------------------------------------------------------------------------
# the formula itself, with every term on


@pytest.mark.parametrize("negative", [None, 1, DOMAIN])
@pytest.mark.parametrize("cfg, weight", [(3.0, 0.7), (0.0, 2.0), (5.5, -0.5)])
def test_decoupled_guidance_is_the_papers_formula(negative, cfg, weight):
    """eps = u + cfg (c - u) - (cfg - 1)(n - u) + w_d (d - u), at every step of a trajectory."""
    errs = []

    def guided(x, s):
        u, c, n, d = oracle_predictions(x, s, 0, negative)
        out = decoupled_guidance(u, c, n, cfg, terms=[GuidanceTerm(d, weight)])
        nn_ = u if n is None else n
        ref = u + cfg * (c - u) - (cfg - 1) * (nn_ - u) + weight * (d - u)
        errs.append(float((out - ref).abs().max() / (1 + ref.abs().max())))
        return out

    pf_ode(guided, start_noise(n=N_EXACT))
    assert max(errs) < 1e-12


# ------------------------------------------------------------------------------------------
# several domain terms, and other parametrisations


def test_two_domain_terms_add_up():
    """Two domain terms that sum to the domain model: 0.5 (d - u) twice, with cfg 0, is d."""
    x = sample_decoupled(cls=0, negative=None, cfg=0.0, domain_weight=[(DOMAIN, 0.5), (DOMAIN, 0.5)])
    name, z = worst_z(x, DOMAIN)
    assert z < Z_MAX, f"{name}: |z| = {z:.2f}"


def test_a_term_cancelling_the_text_term_gives_the_base():
    """cfg 1 on class 2 plus the domain term -1 * (c - u) (a "domain model" that is the class-2
    oracle, weight -1) is u: the base distribution."""
    x = sample_decoupled(cls=2, negative=None, cfg=1.0, domain_weight=[(CLASS_MIX[2], -1.0)])
    name, z = worst_z(x, BASE)
    assert z < Z_MAX, f"{name}: |z| = {z:.2f}"


def test_a_text_free_model_of_one_class_samples_that_class():
    """A text-free model that learned only class 1 (cfg 0, weight 1 on it) samples class 1."""
    x = sample_decoupled(cls=0, negative=None, cfg=0.0, domain_weight=[(CLASS_MIX[1], 1.0)])
    name, z = worst_z(x, CLASS_MIX[1])
    assert z < Z_MAX, f"{name}: |z| = {z:.2f}"


@pytest.mark.parametrize("cfg, weight", [(3.0, 0.7), (0.0, 1.0)])
def test_combining_eps_predictions_gives_the_same_samples(cfg, weight):
    """guidance/ is affine with coefficients summing to one, so combining noise predictions
    eps = (x - D) / sigma gives the same trajectory as combining the x0 predictions."""

    def x0_space(x, s):
        u, c, _, d = oracle_predictions(x, s, 0, None)
        return decoupled_guidance(u, c, None, cfg, terms=[GuidanceTerm(d, weight)])

    def eps_space(x, s):
        xl = as_latent(x)
        u, c, d = ((xl - p) / s for p in oracle_predictions(x, s, 0, None) if p is not None)
        eps = decoupled_guidance(u, c, None, cfg, terms=[GuidanceTerm(d, weight)])
        return xl - s * eps

    a = pf_ode(x0_space, start_noise(n=N_EXACT))
    b = pf_ode(eps_space, start_noise(n=N_EXACT))
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
