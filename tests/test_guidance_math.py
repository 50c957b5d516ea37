"""guidance/: the paper's terms as pure functions (no host)."""
import pytest
import torch

from guidance import (GuidanceTerm, TermInterval, check_percent_interval, covers_whole_run, decoupled_guidance, is_active,
                      ksampler_cfg, text_term)

g = torch.Generator().manual_seed(0)
u, c, n, d = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))


def test_domain_weight_zero_is_ksampler_bit_for_bit():
    assert torch.equal(decoupled_guidance(u, c, n, 7.5, [GuidanceTerm(d, 0.0)]), ksampler_cfg(c, n, 7.5))


def test_text_term_measured_against_u_gives_ksampler():
    assert torch.allclose(u + text_term(c, n, u, 7.5), ksampler_cfg(c, n, 7.5), atol=1e-5)


def test_empty_negative_is_the_papers_formula():
    out = decoupled_guidance(u, c, None, 5.0, [GuidanceTerm(d, 2.0)])
    assert torch.allclose(out, u + 2.0 * (d - u) + 5.0 * (c - u), atol=1e-5)


def test_cfg_zero_domain_one_is_the_domain_prediction():
    assert torch.allclose(decoupled_guidance(u, None, None, 0.0, [GuidanceTerm(d, 1.0)]), d, atol=1e-6)


def test_terms_add_linearly():
    d2 = d * 0.5 + 1
    both = decoupled_guidance(u, c, n, 3.0, [GuidanceTerm(d, 1.0), GuidanceTerm(d2, -0.5)])
    assert torch.allclose(both, ksampler_cfg(c, n, 3.0) + (d - u) - 0.5 * (d2 - u), atol=1e-5)


def test_missing_positive_needs_cfg_zero():
    with pytest.raises(ValueError, match="cfg=2"):
        decoupled_guidance(u, None, n, 2.0)


def test_intervals():
    interval = TermInterval(sigma_start=10.0, sigma_end=1.0)
    assert is_active(interval, 5.0) and not is_active(interval, 11.0) and not is_active(interval, 0.5)
    assert is_active(None, 1e9)
    with pytest.raises(ValueError):
        TermInterval(sigma_start=1.0, sigma_end=2.0)
    with pytest.raises(ValueError, match="start_percent=0.9"):
        check_percent_interval(0.9, 0.1)


def test_only_the_whole_run_needs_no_sigma():
    # The guider skips reading the step's sigma (a GPU sync) only for terms on over the whole run.
    assert covers_whole_run(0.0, 1.0)
    assert not covers_whole_run(0.0, 0.99) and not covers_whole_run(0.01, 1.0) and not covers_whole_run(0.5, 0.5)
    with pytest.raises(ValueError, match="end_percent=1.5"):
        check_percent_interval(0.0, 1.5)
    assert check_percent_interval(0.25, 0.75) == (0.25, 0.75)


def test_the_speed_dial_reuses_each_terms_last_difference_with_its_weight():
    from guidance import add_domain_differences, check_domain_every, recompute_domain

    g = torch.Generator().manual_seed(3)
    guided, d1, d2 = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    assert torch.equal(add_domain_differences(guided, [(d1, 0.0), (d2, 0.0)]), guided)  # weight 0: guided itself
    assert torch.allclose(add_domain_differences(guided, [(d1, 1.5), (d2, -0.5)]), guided + 1.5 * d1 - 0.5 * d2)
    assert [recompute_domain(i, 3) for i in range(7)] == [True, False, False, True, False, False, True]
    assert all(recompute_domain(i, 1) for i in range(5))
    with pytest.raises(ValueError, match="domain_every=0"):
        recompute_domain(0, 0)
    assert check_domain_every(3) == 3
    with pytest.raises(ValueError, match="domain_every=0"):
        check_domain_every(0)
