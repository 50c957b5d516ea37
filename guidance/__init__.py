"""Decoupled multi-guidance (Cao et al., "Image is All You Need to Empower Large-scale
Diffusion Models for In-Domain Generation").

Pure torch: every function takes the model predictions of one sampling step and returns their
guided combination. The predictions may be noise (eps), denoised images (x0) or velocities:
each combination is affine with coefficients that sum to one, so it is the same in all three
parametrisations.
"""
from .combine import (GuidanceTerm, add_domain_differences, add_domain_terms, check_domain_every, decoupled_guidance,
                      domain_term, ksampler_cfg, recompute_domain, text_term)
from .schedule import TermInterval, check_percent_interval, covers_whole_run, is_active

__all__ = [
    "GuidanceTerm",
    "add_domain_differences",
    "add_domain_terms",
    "check_domain_every",
    "check_percent_interval",
    "TermInterval",
    "covers_whole_run",
    "decoupled_guidance",
    "domain_term",
    "is_active",
    "ksampler_cfg",
    "recompute_domain",
    "text_term",
]
