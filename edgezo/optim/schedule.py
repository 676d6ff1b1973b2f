"""Learning-rate schedules: the rate of step t is a pure function of (t, the run's length).

    factor(t) = (t + 1) / w                         t < w (warmup, w steps)
              = 1                                   constant
              = ½ (1 + cos(π p)),  p = (t − w)/(T − w)   cosine, to 0 at T
              = 1 − p                               linear, to 0 at T

No state: a resumed run recomputes the rate of its step, so resume stays exact. Why a decay: a
forward-only step has the same size late as early (ZO-MOPI's is η√k per matrix whatever the gradient),
so a rate that moves fast at the start keeps the iterate bouncing at the end (docs/convergence.md).
"""

from __future__ import annotations

import math

from edgezo.errors import EdgezoError

SCHEDULES = ("constant", "cosine", "linear")


def check(schedule: str, warmup: int, horizon: int) -> None:
    """One clear line for a schedule that cannot run."""
    if schedule not in SCHEDULES:
        raise EdgezoError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup < 0:
        raise EdgezoError(f"warmup {warmup}: the number of warmup steps must be >= 0")
    if schedule != "constant" and horizon <= warmup:
        raise EdgezoError(f"the {schedule} schedule decays over the run's steps (horizon {horizon}); "
                          f"set horizon (tune sets it to --steps) larger than warmup ({warmup})")


def factor(step: int, schedule: str = "constant", warmup: int = 0, horizon: int = 0) -> float:
    """The multiple of the base rate that step `step` (0-based) takes."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / (horizon - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
