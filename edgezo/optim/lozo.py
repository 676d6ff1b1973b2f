"""LOZO (Chen et al., 2024): low-rank probes u·vᵀ with a lazily refreshed right factor.

Probe u vᵀ, u ~ N(0, I_{m×r}) fresh each step, v ~ N(0, I_{n×r}) redrawn every ν steps. Since v is
fixed within a window, the window's update is L·vᵀ with L ← L − (η/r) Ĝ, Ĝ = (1/N) Σ g_i u_i.
The 1/r makes E[g·u vᵀ] = ∇f (spec §10.2 #12). The update regenerates exactly the probed u
(own generator per probe), so the released code's refresh-step mismatch (B3) cannot happen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.delta import DeltaTarget
from edgezo.zo.probes import gaussian


@dataclass
class LOZO:
    rank: int = 2
    interval: int = 50
    name: str = "lozo"
    side: str = "left"

    def _rank(self, target: DeltaTarget) -> int:
        return min(self.rank, target.out_features, target.in_features)

    def init(self, target: DeltaTarget, state: dict, seed: int) -> None:
        r = self._rank(target)
        target.left = torch.zeros(target.out_features, r, device=target.device)
        self.refresh(target, state, seed)

    def refresh(self, target: DeltaTarget, state: dict, seed: int) -> None:
        target.right = gaussian((self._rank(target), target.in_features), seed, target.device)

    def update(self, state: dict, grad: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        return grad.mul_(lr / grad.shape[-1])  # grad: (…, m, r) coordinates of L
