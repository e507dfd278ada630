"""Schedules as pure functions of the global optimizer step (DESIGN rule 7)."""
from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, total_steps: int, peak: float, warmup_steps: int = 0, floor: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine to ``floor`` at ``total_steps``.

    ``step`` is the number of optimizer steps already taken (0 for the first step).
    """
    if total_steps <= 0:
        return peak
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / span))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
