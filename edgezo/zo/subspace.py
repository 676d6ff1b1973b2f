"""Orthonormal subspace bases P (m×r) and their refresh.

A subspace method probes W along P·u with u ∈ R^{r×n} Gaussian, so every probe and update of W
lives in the column space of P. The paper refreshes P every ν steps, anchored to the momentum:
the momentum's top-k left singular directions are kept, the rest is drawn fresh, and the momentum
is re-expressed in the new basis.
"""

from __future__ import annotations

import torch

from edgezo.zo.probes import gaussian


def orthonormalize(a: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of `a` with the sign fix diag(R) > 0, so the basis is unique (Haar for Gaussian `a`).

    `a` may be a batch (…, n, k): each matrix gets its own QR and sign fix.
    """
    q, r = torch.linalg.qr(a.float())
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, 1.0, signs)  # not a masked assignment: that syncs a GPU
    # LAPACK's Q is column-major; one layout keeps matmuls bitwise on resume
    return (q * signs.unsqueeze(-2)).contiguous()


def haar_basis(m: int, r: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly random m×r matrix with orthonormal columns (the released code's refresh)."""
    return orthonormalize(gaussian((m, r), seed, device))


def anchored_basis(p_old: torch.Tensor, momentum: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The paper's momentum-projected refresh.

    With M = U S Vᵀ (r×n, coordinates in P_old), keep the k dominant directions P_old·U_k and fill
    the remaining r−k columns at random:  P_new = QR([P_old U_k | G]),  G ~ N(0, I_{m×(r−k)}).
    A zero momentum (nothing learned yet) gives a plain Haar basis.
    """
    m, r = p_old.shape
    k = min(k, r)
    if k == 0 or not torch.any(momentum):
        return haar_basis(m, r, seed, p_old.device)
    u, _, _ = torch.linalg.svd(momentum.float(), full_matrices=False)
    anchor = p_old.float() @ u[:, :k]
    fresh = gaussian((m, r - k), seed, p_old.device)
    return orthonormalize(torch.cat([anchor, fresh], dim=1))


def reproject(p_new: torch.Tensor, p_old: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Coordinates X (r×n) in P_old re-expressed in P_new: P_newᵀ P_old X (no 1/m: both bases are orthonormal)."""
    return (p_new.T @ p_old) @ coords
