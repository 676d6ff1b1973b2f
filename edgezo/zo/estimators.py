"""Finite-difference estimators: which perturbed losses to evaluate, and the scalar per probe.

A *slice* is one loss evaluation: `(probe index, sign)`, with probe -1 for the unperturbed point.
The engine evaluates all slices of a step (fused into one forward or not) and hands the losses back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slice:
    probe: int  # -1: the unperturbed model
    sign: float  # the perturbation is sign * eps * probe


def slices(n_probes: int, two_sided: bool) -> list[Slice]:
    """Two-sided: (+i, -i) for each probe, 2N evaluations. One-sided: a shared baseline, N+1."""
    if two_sided:
        return [Slice(i, s) for i in range(n_probes) for s in (1.0, -1.0)]
    return [Slice(-1, 0.0)] + [Slice(i, 1.0) for i in range(n_probes)]


def probe_scalars(losses: torch.Tensor, n_probes: int, two_sided: bool, eps: float) -> tuple[torch.Tensor, float]:
    """Per-probe directional derivatives g_i and the step's reported loss.

    Two-sided: g_i = (f(θ+εz_i) − f(θ−εz_i)) / 2ε, loss = mean of all evaluations.
    One-sided: g_i = (f(θ+εz_i) − f(θ)) / ε,       loss = f(θ).
    """
    losses = losses.double()
    if two_sided:
        pairs = losses.view(n_probes, 2)
        return ((pairs[:, 0] - pairs[:, 1]) / (2 * eps)).float(), float(losses.mean())
    return ((losses[1:] - losses[0]) / eps).float(), float(losses[0])
