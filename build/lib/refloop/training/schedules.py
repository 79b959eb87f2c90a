"""Learning-rate schedules as pure functions of the step, so a resumed run sets the same rate as an
uninterrupted one without any scheduler state."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up to `peak` over `warmup_steps` (step 0 already trains, at peak / warmup_steps),
    then a cosine from `peak` down to `min_ratio * peak`, reached at step `decay_steps` and held."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
