"""The perturbations of one forward: which probe, at which scale, each slice of the stacked batch carries.

The delta path (edgezo/delta.py, edgezo/vector_delta.py) applies them; it hands this module the targets, which
draw their own probes, so this module needs nothing of the delta path but that one method (ProbedTarget).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch


class ProbedTarget(Protocol):
    """What probing needs of a trained module (edgezo.delta.DeltaTarget): its probes of a step."""

    def probe_chunks(self, step_seed: int, n_probes: int, device: torch.device,
                     wanted: Collection[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]: ...


@dataclass
class Probing:
    """The perturbations of the current forward: slice s carries scales[s] · probe probes[s] (-1: none)."""

    step_seed: int
    n_probes: int
    probes: list[int]
    scales: list[float]
    _cache: dict = field(default_factory=dict, repr=False)  # _groups, _unperturbed: shared by all targets

    @functools.cached_property
    def wanted(self) -> tuple[int, ...]:
        """The probes this forward applies (those of its perturbed slices)."""
        return tuple(sorted({p for p, scale in zip(self.probes, self.scales) if p >= 0 and scale != 0.0}))

    def blocks(self, target: ProbedTarget, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
        """The target's blocks of the probes this forward applies. Drawn in the calling thread: between the
        forward's matmuls torch's OpenMP threads spin on the other cores (draw threads there gained nothing
        on 2 cores, docs/benchmarks.md), where the update's draws gain."""
        wanted = None if len(self.wanted) == self.n_probes else self.wanted
        return target.probe_chunks(self.step_seed, self.n_probes, device, wanted)

    def perturbed(self, coords: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]],
                  dtype: torch.dtype) -> torch.Tensor:
        """(S, *coords.shape) in `dtype`: coords + scale_s · probe s for each slice s, summed in fp32 and
        rounded once, each slice written once. `blocks`: the step's probes as (index of the first, block).

        No index tensor is built where the slices are evenly spaced, so a GPU is never synced here.
        """
        w = torch.empty(len(self.scales), *coords.shape, dtype=dtype, device=coords.device)
        coords, baseline = coords.float(), self._unperturbed()
        if baseline != []:  # (an empty index would still cost a host-to-device copy)
            w[baseline] = coords.to(dtype)
        for first, block in blocks:
            for scale, sel, pick in self._groups(first, len(block)):
                if isinstance(sel, slice) and isinstance(pick, slice):
                    torch.add(coords, block[pick], alpha=scale, out=w[sel])
                else:
                    w[sel] = torch.add(coords, block[pick], alpha=scale).to(dtype)
        return w

    def add_probes(self, target: ProbedTarget, x: torch.Tensor, acc: torch.Tensor) -> None:
        """acc[slice s] += scale_s · x[slice s] @ probe_sᵀ for every perturbed slice, in place (full-space
        probes: a dense m×n per slice would be too big to form as `perturbed` does).

        The probes come in blocks (DeltaTarget.probe_chunks); the slices of a block that share a
        scale are added by one batched matmul.
        """
        n = len(self.scales)
        xs = x.view(n, -1, x.shape[-1])
        acc = acc.view(n, -1, acc.shape[-1])
        for first, block in self.blocks(target, x.device):
            u = block.to(x.dtype).mT
            for scale, sel, pick in self._groups(first, len(block)):
                if isinstance(sel, slice) and isinstance(pick, slice):  # views of the stacked rows
                    acc[sel].baddbmm_(xs[sel], u[pick], alpha=scale)
                else:
                    idx = torch.tensor(sel, device=x.device)
                    acc.index_add_(0, idx, torch.bmm(xs[idx], u[pick]), alpha=scale)

    def _unperturbed(self) -> slice | list[int]:
        """The slices that carry no probe (the one-sided baseline), as a slice where possible."""
        if "unperturbed" not in self._cache:
            idx = [s for s, (p, scale) in enumerate(zip(self.probes, self.scales)) if p < 0 or scale == 0.0]
            self._cache["unperturbed"] = (_progression(idx) or idx) if idx else []
        return self._cache["unperturbed"]

    def _groups(self, first: int, count: int) -> list[tuple[float, slice | list[int], slice | list[int]]]:
        """(scale, slices, rows of the block) for the perturbed slices whose probe is in the block,
        as slices where evenly spaced (views, no index tensor); the same for every target, so cached."""
        key = (first, count)
        if key not in self._cache:
            groups: dict[float, tuple[list[int], list[int]]] = {}
            for s, (p, scale) in enumerate(zip(self.probes, self.scales)):
                if first <= p < first + count and scale != 0.0:
                    slices, rows = groups.setdefault(scale, ([], []))
                    slices.append(s)
                    rows.append(p - first)
            self._cache[key] = [
                (scale, _progression(slices) or slices, _progression(rows) or rows)
                for scale, (slices, rows) in groups.items()
            ]
        return self._cache[key]


def _progression(idx: list[int]) -> slice | None:
    """The slice that selects exactly the increasing indices `idx`, if they are evenly spaced."""
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return slice(idx[0], idx[-1] + 1, step)
    return None
