"""lr="auto": pick the step size with a short probe on held-out rows, so nobody sweeps.

    for each candidate η in a grid around the method's default (docs/defaults.md):
        from the starting state, run `steps` steps at η on the run's first batches
        score η by the loss on rows those steps did not train on
        restore the starting state exactly (delta factors + optimizer state)
    keep the η of the lowest score (a non-finite loss scores +inf)

Deterministic: the batches and probes are the run's own (functions of seed and step), so the choice is
too; tune records it in the checkpoint's metadata, and a resume reads it instead of probing again.
Its forwards count in the run's total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgezo import data as data_mod
from edgezo.optim import DEFAULTS, ZOOptimizer

AUTO = "auto"
GRID = (1 / 3, 1.0, 3.0)  # multiples of the method's default rate tried (the defaults' own sweep steps by 3x)
PROBE_STEPS = 10  # per candidate: past the label-prior phase's first steps (docs/convergence.md), short of a window
HELD_ROWS = 16


@dataclass
class ProbeResult:
    lr: float
    scores: dict[float, float]  # candidate rate -> held-out loss after the probe's steps
    forwards: int


def candidates(name: str, variant: str = "paper") -> list[float]:
    """The rates tried for optimizer `name`: its default times GRID."""
    base = DEFAULTS[f"{name}-released" if variant == "released" else name][1].lr
    return [base * m for m in GRID]


def held_out_batch(task: data_mod.TaskData, batch_size: int, seed: int, steps: int, rows: int = HELD_ROWS) -> dict:
    """`rows` training rows that the probe's `steps` batches of `batch_size` come before: the batch of
    step ceil(steps·batch_size / rows) at `rows` per step (the same permutation, farther on)."""
    return data_mod.batch_at(task, rows, seed, math.ceil(steps * batch_size / rows))


@torch.no_grad()
def probe_lr(opt: ZOOptimizer, loss_fn, batches: list[dict], held: dict, rates: list[float]) -> ProbeResult:
    """Try each rate for len(batches) steps from `opt`'s current state; leave opt at that state with the best rate."""
    delta = opt.delta
    start_delta = {k: v.clone() for k, v in delta.state_dict().items()}
    start_opt = opt.state_dict()
    start_opt = {**start_opt, "tensors": {k: v.clone() for k, v in start_opt["tensors"].items()}}
    scores, forwards = {}, 0
    for lr in rates:
        opt.config.lr = lr
        try:
            for batch in batches:
                forwards += opt.step(loss_fn, batch).forwards
            score = float(loss_fn(delta.model, held, 1)[0])
            forwards += 1
        except FloatingPointError:
            score = math.inf
        scores[lr] = score if math.isfinite(score) else math.inf
        delta.load_state_dict({k: v.clone() for k, v in start_delta.items()})
        opt.load_state_dict({**start_opt, "tensors": {k: v.clone() for k, v in start_opt["tensors"].items()}})
    best = min(rates, key=lambda lr: (scores[lr], lr))  # ties: the smaller, safer rate
    opt.config.lr = best
    return ProbeResult(best, scores, forwards)
