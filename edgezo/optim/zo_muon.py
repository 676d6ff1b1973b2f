"""ZO-Muon (Lang et al., 2026): subspace probes P·u and an orthogonalized update.

P (m×r) orthonormal, redrawn (Haar) every ν steps; probe P·u with u ~ N(0, I_{r×n});
Ĝ = (1/N) Σ g_i u_i (r×n coordinates); update C ← C − η·orth(Ĝ), i.e. W ← W − η P orth(Ĝ),
with orth = Newton–Schulz (`ns5`), exact polar factor (`svd`) or identity (`sgd`, "Subspace-MeZO").
P is drawn once per refresh from its own generator, so all queries of a step share it (fixes B2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.delta import DeltaTarget
from edgezo.zo.orthogonalize import newton_schulz5, svd_polar
from edgezo.zo.subspace import haar_basis

ORTHOGONALIZERS = {"ns5": newton_schulz5, "svd": svd_polar, "sgd": lambda g: g}


@dataclass
class ZOMuon:
    rank: int = 64
    interval: int = 100
    orthogonalizer: str = "ns5"
    name: str = "zo-muon"
    side: str = "right"

    def init(self, target: DeltaTarget, state: dict, seed: int) -> None:
        r = min(self.rank, target.out_features)
        target.left = haar_basis(target.out_features, r, seed, target.device)
        target.right = torch.zeros(r, target.in_features, device=target.device)

    def refresh(self, target: DeltaTarget, state: dict, seed: int) -> None:
        target.left = haar_basis(target.out_features, target.left.shape[1], seed, target.device)

    def update(self, state: dict, grad: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        return ORTHOGONALIZERS[self.orthogonalizer](grad).mul_(lr)
