"""Orthonormal subspace bases P (m×r) and their refresh.

A subspace method probes W along P·u with u ∈ R^{r×n} Gaussian, so every probe and update of W
lives in the column space of P. The paper refreshes P every ν steps, anchored to the momentum:
the momentum's top-k left singular directions are kept, the rest is drawn fresh, and the momentum
is re-expressed in the new basis.
"""

from __future__ import annotations

import torch

from edgezo.zo.probes import gaussian


def long_matmul(a: torch.Tensor, b: torch.Tensor, split: bool | None = None) -> torch.Tensor:
    """a @ b (batched) where the reduction dim K is much longer than the output (r×n times n×k).

    CUDA's batched GEMM gives such a product only a few thread blocks per matrix, each walking all of
    K; cutting K into pieces multiplied in parallel, then summed, keeps the GPU busy. `split`
    (default: on CUDA only; CPU BLAS needs no help) forces the choice.
    """
    k = a.shape[-1]
    pieces = min(k // 256, 64)
    while pieces > 1 and k % pieces:
        pieces -= 1
    if not (a.device.type == "cuda" if split is None else split) or pieces <= 1:
        return a @ b
    a = a.unflatten(-1, (pieces, k // pieces)).movedim(-2, -3)  # (…, pieces, M, K/pieces)
    return (a @ b.unflatten(-2, (pieces, k // pieces))).sum(dim=-3)


def orthonormalize(a: torch.Tensor, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Q of the reduced QR of `a` with the sign fix diag(R) > 0, so the basis is unique (Haar for Gaussian `a`).

    `a` may be a batch (…, n, k): each matrix gets its own Q. A tall matrix goes through Cholesky QR
    (_cholesky_qr): a few batched matmuls, where CUDA's Householder QR runs one sequential
    factorization per matrix of more than 256 rows (on CPU it is as fast as LAPACK's). Where it fails
    (`a` rank-deficient, or so ill-conditioned that its fp64 Gram matrix is not positive definite) the
    matrix gets `fallback` instead, if given (no host sync), else Householder QR.
    """
    a = a.float()
    if a.shape[-2] < a.shape[-1] or a.device.type == "mps":  # wide: Q is square; MPS: no fp64
        return _householder(a)
    q, failed = _cholesky_qr(a)
    if fallback is not None:
        return torch.where(failed[..., None, None], fallback.to(q), q)
    if bool(failed.any()):
        q = torch.where(failed[..., None, None], _householder(a), q)
    return q


def _cholesky_qr(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, failed) by Cholesky QR twice (CholeskyQR2): R = chol(AᵀA), Q = A R⁻¹, then once more on Q to
    remove what rounding left. Cholesky's R has a positive diagonal, so Q is Householder's sign-fixed Q.
    The first Gram matrix squares cond(A), so that pass runs in fp64 (good to cond(A) ~1e7); Q is then
    nearly orthonormal and the second pass is exact enough in fp32."""
    eye = torch.eye(a.shape[-1], device=a.device)
    q, failed = a.double(), torch.zeros(a.shape[:-2], dtype=torch.bool, device=a.device)
    for _ in range(2):
        r, info = torch.linalg.cholesky_ex(long_matmul(q.mT, q), upper=True)
        q = q @ torch.linalg.solve_triangular(r, eye.to(q.dtype), upper=True)  # one k×k inverse, then a matmul
        failed |= (info != 0) | ~torch.isfinite(r.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
        q = q.float()
    return q.contiguous(), failed


def _householder(a: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(a)
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
