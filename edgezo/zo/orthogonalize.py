"""Orthogonalizers: map a gradient-like matrix G (r×n) to an update with flattened spectrum.

Each is a pure function on plain tensors, computed in fp32. Each also takes a batch (…×r×n) and
treats every matrix on its own, so the update of many same-shape targets is one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgezo.zo.subspace import long_matmul, orthonormalize


def svd_polar(g: torch.Tensor) -> torch.Tensor:
    """The exact polar factor U Vᵀ of G = U S Vᵀ: all nonzero singular values set to 1."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return u @ vh


def newton_schulz5(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Quintic Newton–Schulz iteration towards the polar factor, as in Muon.

    X ← aX + b(XXᵀ)X + c(XXᵀ)²X with (a, b, c) = (3.4445, −4.7750, 2.0315), from X₀ = G/‖G‖_F.
    The coefficients trade exactness for speed: after 5 steps the singular values lie in about
    [0.7, 1.2] rather than at 1, which Muon found does not hurt optimization. Odd and scale-invariant.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the short side: XXᵀ is then the small Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # per matrix, not over the batch
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


def streaming_power_iteration(
    g: torch.Tensor, v_prev: torch.Tensor | None, k: int, seed_start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration sweep towards the top-k right singular space of G, warm-started.

    V₀ = V_prev (orthonormal: the V this function returned last step), or QR(`seed_start`),
    V  = QR(GᵀG V₀),  U = colnorm(G V),  O = U Vᵀ.
    O is the *partial* orthogonalization of G: rank k, ‖O‖_F = √k, row space span(V). When V_prev
    already spans G's top-k right singular vectors, O is exactly U_k V_kᵀ (the polar factor
    restricted to the k dominant directions). Warm-starting from the previous step's V is what lets
    a single sweep per step track the slowly moving momentum ("streaming").
    Returns (O, V); G (…×r×n) and V_prev (…×n×k) may carry a batch of matrices on the leading dims.
    """
    g = g.float()
    if v_prev is not None:
        v0 = v_prev.float()[..., :k]
    elif seed_start is not None:
        v0 = orthonormalize(seed_start.float())[..., :k]
    else:
        raise ValueError("streaming_power_iteration needs v_prev or seed_start")
    v = orthonormalize(g.mT @ long_matmul(g, v0), fallback=v0)  # a zero momentum (every g_i = 0) keeps V
    u = F.normalize(long_matmul(g, v), dim=-2, eps=1e-12)
    return u @ v.mT, v
