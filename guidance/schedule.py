"""When a guidance term is on: an interval of the sampling run per term.

Intervals are given, as in ComfyUI's ConditioningSetTimestepRange, as fractions of the
denoising process: start 0.0 is the first (noisiest) step, end 1.0 the last. The host turns a
fraction into a noise level sigma with its own model_sampling; this module compares sigmas
only, so it needs no host.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TermInterval:
    """The noise levels at which a term is active: sigma_end <= sigma <= sigma_start."""

    sigma_start: float = float("inf")  # the term starts once sigma has fallen to this
    sigma_end: float = 0.0  # and stops below this

    def __post_init__(self):
        if self.sigma_end > self.sigma_start:
            raise ValueError(
                f"empty guidance interval: it ends at sigma {self.sigma_end} above its start {self.sigma_start}"
            )


def is_active(interval: TermInterval | None, sigma: float) -> bool:
    """True where the term contributes at noise level sigma (None: always on)."""
    if interval is None:
        return True
    return interval.sigma_end <= sigma <= interval.sigma_start


def covers_whole_run(start_percent: float, end_percent: float) -> bool:
    """True for the interval [0, 1]: on at every noise level, so no sigma needs to be looked at."""
    return start_percent <= 0.0 and end_percent >= 1.0


def check_percent_interval(start_percent: float, end_percent: float) -> tuple[float, float]:
    """Check a user's (start, end) pair of fractions of the run and return it unchanged.

    Raises ValueError, naming both values, for values outside [0, 1] or start > end.
    """
    for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v} is outside [0, 1] (0 = first step, 1 = last step)")
    if start_percent > end_percent:
        raise ValueError(f"start_percent={start_percent} is after end_percent={end_percent}; the term would never run")
    return start_percent, end_percent
