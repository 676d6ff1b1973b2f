"""Numerical invariants of the pure ZO pieces (spec §10.2: 1, 4, 6–10, 13, 14)."""

import math

import pytest

import torch

from edgezo.zo.orthogonalize import newton_schulz5, streaming_power_iteration, svd_polar
from edgezo.zo.probes import derive_seed, gaussian
from edgezo.zo.subspace import _cholesky_qr, anchored_basis, haar_basis, long_matmul, orthonormalize, reproject


def _matrix(r=16, n=48, seed=0):
    """A random r×n matrix with a log-spaced spectrum (distinct singular values)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.logspace(0, -2, r)
    return (u * s) @ v.T


def test_probe_regeneration_is_bitwise_and_streams_independent():  # §10.2 #1
    a = gaussian((8, 32), derive_seed(7, 3, 1))
    b = gaussian((8, 32), derive_seed(7, 3, 1))
    assert torch.equal(a, b)
    # a different probe/step/target never reproduces the stream, and order of keys matters
    assert not torch.equal(a, gaussian((8, 32), derive_seed(7, 3, 2)))
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_haar_basis_orthonormal_and_sign_fixed():  # §10.2 #4
    p = haar_basis(40, 8, seed=3)
    assert torch.allclose(p.T @ p, torch.eye(8), atol=1e-5)
    # sign fix: the Gaussian it came from has an upper-triangular R with positive diagonal
    a = gaussian((40, 8), 3)
    r = p.T @ a
    assert torch.allclose(torch.tril(r, -1), torch.zeros(8, 8), atol=1e-4)
    assert (torch.diagonal(r) > 0).all()


def test_power_iteration_output_norm_rank_and_unit_columns():  # §10.2 #6
    g = torch.randn(16, 48)
    v0 = torch.randn(48, 6)
    o, v = streaming_power_iteration(g, v0, 6)
    assert math.isclose(o.norm().item(), math.sqrt(6), rel_tol=1e-5)
    assert torch.linalg.matrix_rank(o).item() == 6
    assert torch.allclose((o @ v).norm(dim=0), torch.ones(6), atol=1e-5)
    assert torch.allclose(o @ (torch.eye(48) - v @ v.T), torch.zeros(16, 48), atol=1e-5)  # row space span(V)


def test_exact_warm_start_gives_restricted_polar_factor():  # §10.2 #7
    g = _matrix()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    k = 5
    o, _ = streaming_power_iteration(g, vh[:k].T, k)
    assert torch.allclose(o, u[:, :k] @ vh[:k], atol=1e-4)
    o_full, _ = streaming_power_iteration(g, vh.T, g.shape[0])  # k = r: the full polar factor
    assert torch.allclose(o_full, svd_polar(g), atol=1e-4)


def test_power_iteration_converges_to_top_k_subspace():  # §10.2 #8
    g = _matrix()
    k = 4
    true_v = torch.linalg.svd(g, full_matrices=False).Vh[:k].T
    v = torch.randn(48, k)
    cosines = []
    for _ in range(30):
        _, v = streaming_power_iteration(g, v, k)
        cosines.append(torch.linalg.svdvals(true_v.T @ v).min().item())
    assert cosines[-1] > 0.999
    assert cosines[-1] >= cosines[0]


def test_invariances_scale_and_sign():  # §10.2 #9
    g, v0 = torch.randn(16, 48), torch.randn(48, 6)
    o, _ = streaming_power_iteration(g, v0, 6)
    assert torch.allclose(streaming_power_iteration(3.7 * g, v0, 6)[0], o, atol=1e-5)
    assert torch.allclose(streaming_power_iteration(-g, v0, 6)[0], -o, atol=1e-5)
    ns = newton_schulz5(g)
    assert torch.allclose(newton_schulz5(250.0 * g), ns, atol=1e-4)
    assert torch.allclose(newton_schulz5(-g), -ns, atol=1e-5)


def test_newton_schulz_spectrum_is_approximate():  # §10.2 #10
    g = torch.randn(64, 256)
    s = torch.linalg.svdvals(newton_schulz5(g))
    assert s.min() > 0.6 and s.max() < 1.25
    assert not torch.allclose(s, torch.ones_like(s), atol=1e-2)  # approximate, not exact
    assert newton_schulz5(g.T).shape == (256, 64)


def test_polar_is_equivariant_under_orthogonal_p():  # §10.2 #13: r = m reduces ZO-Muon to full space
    p = haar_basis(16, 16, seed=1)
    x = torch.randn(16, 24)
    assert torch.allclose(svd_polar(p @ x), p @ svd_polar(x), atol=1e-4)


def test_one_sweep_from_random_start_is_not_the_polar_factor():  # §10.2 #14
    g = _matrix(r=8, n=32)
    k = 8
    one, _ = streaming_power_iteration(g, torch.randn(32, k), k)
    assert (one - svd_polar(g)).norm() > 0.05
    v = torch.randn(32, k)
    for _ in range(200):
        o, v = streaming_power_iteration(g, v, k)
    assert torch.allclose(o, svd_polar(g), atol=1e-3)


def test_anchored_basis_keeps_momentum_directions_and_reprojection_is_exact():
    m, r, n, k = 40, 8, 24, 3
    p_old = haar_basis(m, r, seed=0)
    mom = torch.randn(r, k) @ torch.randn(k, n)  # momentum of rank k: fully captured by the anchor
    p_new = anchored_basis(p_old, mom, k, seed=1)
    assert torch.allclose(p_new.T @ p_new, torch.eye(r), atol=1e-5)
    moved = reproject(p_new, p_old, mom)
    assert torch.allclose(p_new @ moved, p_old @ mom, atol=1e-4)  # same weight-space momentum, no 1/m
    # a plain Haar refresh loses most of it
    p_rand = haar_basis(m, r, seed=2)
    lost = (p_rand @ reproject(p_rand, p_old, mom) - p_old @ mom).norm() / (p_old @ mom).norm()
    assert lost > 0.3


def test_orthonormalize_handles_rank_deficient_input():
    q = orthonormalize(torch.zeros(10, 3))
    assert torch.isfinite(q).all()


def test_cholesky_qr_is_householder_qr_with_positive_diagonal():
    a = torch.randn(3, 500, 16, generator=torch.Generator().manual_seed(0))
    q, failed = _cholesky_qr(a)
    reference, r = torch.linalg.qr(a.double())
    reference = reference * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    assert not failed.any()
    assert (q.double() - reference).abs().max() < 1e-5
    assert (q.mT @ q - torch.eye(16)).abs().max() < 1e-5


def test_cholesky_qr_stays_orthonormal_when_ill_conditioned():
    u, _ = torch.linalg.qr(torch.randn(400, 12, generator=torch.Generator().manual_seed(1)))
    a = u * torch.logspace(0, -6, 12)  # cond 1e6: squared by the Gram matrix, still within fp64
    q, failed = _cholesky_qr(a[None])
    assert not failed.any() and (q[0].mT @ q[0] - torch.eye(12)).abs().max() < 1e-5


def test_orthonormalize_of_a_rank_deficient_matrix_falls_back():
    z = torch.zeros(2, 40, 4)
    z[1] = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    fallback = orthonormalize(torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(3)))
    q = orthonormalize(z, fallback=fallback)
    assert torch.equal(q[0], fallback[0])  # the zero matrix: the fallback, untouched
    assert torch.allclose(q[1], orthonormalize(z[1]), atol=1e-6)  # the other: its own Q
    alone = orthonormalize(z[0])  # no fallback: Householder's (orthonormal) completion
    assert torch.allclose(alone.mT @ alone, torch.eye(4), atol=1e-6)


def test_zero_momentum_keeps_the_power_iteration_state():
    v0 = orthonormalize(torch.randn(32, 4, generator=torch.Generator().manual_seed(4)))
    o, v = streaming_power_iteration(torch.zeros(8, 32), v0, 4)
    assert torch.equal(v, v0) and not o.any()


@pytest.mark.parametrize("k", [4096, 1000, 257])
def test_split_long_matmul_equals_the_plain_product(k):
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(3, 8, k, generator=gen, dtype=torch.float64)
    b = torch.randn(3, k, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(long_matmul(a, b, split=True), a @ b, atol=1e-9)
    assert torch.allclose(long_matmul(b.mT, b, split=True), b.mT @ b, atol=1e-9)  # a transposed view
