"""ZO-MOPI (Chen & Ma, 2026): momentum-projected subspace + partial orthogonalization.

For each target W (m×n), with orthonormal A = P (m×r) and probes B_i = u_i (r×n):

    Ĝ_t = (1/N) Σ_i g_i B_i                      g_i from f(X ± μ A B_i)      (estimators.py)
    M_t = β M_{t−1} + (1−β) Ĝ_t                                              (M_0 = 0)
    V_t = QR(M_tᵀ M_t V_{t−1}),   U_t = colnorm(M_t V_t)                      one power-iteration sweep
    X  ← X − η A U_t V_tᵀ                                                      ‖ΔX‖_F = η√k
      adaptive:  X ← X − η (ν̄_t / max_{s≤t} ν̄_s) A U_t V_tᵀ,   ν̄_t = ρ ν̄_{t−1} + (1−ρ)‖M_t‖_F
    every ν steps: A ← QR([A U_k(M) | G]),  M ← A_newᵀ A_old M,  V carried   momentum-anchored refresh

The paper's step has the same norm η√k whatever the gradient's size, so a rate fast enough early keeps
the iterate bouncing once the gradient fades (docs/convergence.md: collapse at 9e-2). `adaptive=True`
scales it by the momentum's norm (smoothed, ν̄) over the largest it has been: the step keeps its full size
while the signal is at its strongest and shrinks with it. ‖Ĝ‖ ≈ ‖∇‖·√(rn/N) is proportional to the
gradient's size even where its direction is noise, so the ratio tracks the gradient. ν̄ and its
maximum are state tensors like M and V.

`update` runs these equations for a batch of same-shape targets at once (M, Ĝ, V with a leading batch dim).

`variant="released"` (see `released()`) reproduces the authors' code's choices — Haar refresh, V
reset at refresh, β = 0, one-sided N+1 queries — without its bugs (B1, B5: every draw has its own
generator, and the momentum is reprojected without the spurious 1/m).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgezo.delta import DeltaTarget
from edgezo.dtypes import FLOAT_DTYPES
from edgezo.errors import EdgezoError
from edgezo.zo.orthogonalize import streaming_power_iteration
from edgezo.zo.probes import derive_seed, gaussian
from edgezo.zo.subspace import anchored_basis, haar_basis, orthonormalize, reproject


@dataclass
class ZOMOPI:
    rank: int = 64
    k: int = 32
    beta: float = 0.9
    interval: int = 100
    anchored: bool = True  # paper: refresh keeps the momentum's top-k directions; released: Haar
    carry_v: bool = True  # paper: power-iteration state survives a refresh; released: reset
    state_dtype: str = "fp32"  # P, M and V as stored; "bf16"/"fp16" halve them (the math stays fp32, C is fp32)
    adaptive: bool = False  # step norm follows ‖M‖ (over its running maximum) instead of the fixed η√k
    norm_decay: float = 0.9  # ρ, the smoothing of ‖M‖ that adaptive steps by
    name: str = "zo-mopi"
    side: str = "right"

    def init(self, target: DeltaTarget, state: dict, seed: int) -> None:
        m, n = target.out_features, target.in_features
        r = min(self.rank, m)
        target.left = haar_basis(m, r, seed, target.device).to(self._dtype)
        target.right = torch.zeros(r, n, device=target.device)  # C accumulates every step: always fp32
        state["momentum"] = torch.zeros(r, n, device=target.device, dtype=self._dtype)
        state["v"] = self._random_v(target, r, seed)
        if self.adaptive:  # ν̄ and its maximum; 0 until the first step
            state["norm_avg"] = torch.zeros((), device=target.device)
            state["norm_max"] = torch.zeros((), device=target.device)

    @property
    def _dtype(self) -> torch.dtype:
        if self.state_dtype not in FLOAT_DTYPES:
            raise EdgezoError(f"state_dtype {self.state_dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[self.state_dtype]

    def _random_v(self, target: DeltaTarget, r: int, seed: int) -> torch.Tensor:
        k = min(self.k, r, target.in_features)
        v = orthonormalize(gaussian((target.in_features, k), derive_seed(seed, 1), target.device))
        return v.to(self._dtype)

    def refresh(self, target: DeltaTarget, state: dict, seed: int) -> None:
        p_old, r = target.left.float(), target.left.shape[1]
        if self.anchored:
            p_new = anchored_basis(p_old, state["momentum"], self.k, seed)
        else:
            p_new = haar_basis(target.out_features, r, seed, target.device)
        p_new = p_new.to(self._dtype)  # M is re-expressed in the basis as stored, the one the forward uses
        state["momentum"] = reproject(p_new.float(), p_old, state["momentum"].float()).to(self._dtype)
        if not self.carry_v:
            state["v"] = self._random_v(target, r, seed)
        target.left = p_new

    def update(self, state: dict, grad: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        m = state["momentum"].mul_(self.beta).add_(grad, alpha=1 - self.beta)
        o, v = streaming_power_iteration(m, state["v"], state["v"].shape[-1])
        state["v"] = v.to(self._dtype)
        if self.adaptive:
            return o.mul_(self._gain(state, m).view(-1, 1, 1) * lr)
        return o.mul_(lr)

    def _gain(self, state: dict, m: torch.Tensor) -> torch.Tensor:
        """ν̄_t / max_s ν̄_s per target (B,): 1 while the momentum grows, less as the gradient fades."""
        norm, avg = torch.linalg.vector_norm(m.float(), dim=(-2, -1)), state["norm_avg"]
        avg = torch.where(avg > 0, avg * self.norm_decay + norm * (1 - self.norm_decay), norm)  # ν̄_1 = ‖M_1‖
        state["norm_avg"], state["norm_max"] = avg, torch.maximum(state["norm_max"], avg)
        return avg / state["norm_max"].clamp_min(torch.finfo(torch.float32).tiny)


def released() -> ZOMOPI:
    """The released code's algorithm (ZOMuonTrainer, README recipe), bugs fixed."""
    return ZOMOPI(rank=64, k=32, beta=0.0, interval=500, anchored=False, carry_v=False)
