"""MeZO (Malladi et al., 2023): full-space Gaussian SPSA.

Probe z ~ N(0, I_{m×n}); update D ← D − η Ĝ with Ĝ = (1/N) Σ g_i z_i. The accumulated update is a
dense m×n matrix beside the base (the baseline's price for full-rank updates: one extra weight copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.delta import DeltaTarget


@dataclass
class MeZO:
    name: str = "mezo"
    side: str = "full"
    interval: int = 0

    def init(self, target: DeltaTarget, state: dict, seed: int) -> None:
        target.dense = torch.zeros(target.out_features, target.in_features, device=target.device)

    def refresh(self, target: DeltaTarget, state: dict, seed: int) -> None:
        pass

    def update(self, state: dict, grad: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        return grad.mul_(lr)
