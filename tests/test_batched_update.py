"""The update batched over same-shape targets equals the per-target update, chunked or not."""

import pytest
import torch
from conftest import tiny

from edgezo.delta import DeltaModel
from edgezo.optim import LOZO, ZOMOPI, ZOMuon, base, make_optimizer
from edgezo.optim.zo_muon import ORTHOGONALIZERS
from edgezo.zo.orthogonalize import newton_schulz5, streaming_power_iteration, svd_polar
from edgezo.zo.subspace import orthonormalize

# (optimizer, variant, settings); the tiny Llama's Linears give 2 (subspace, LOZO) or 3 (MeZO) probe shapes
CASES = [
    ("zo-mopi", "paper", dict(rank=8, k=4, interval=2)),
    ("zo-mopi", "released", dict(rank=8, k=4, interval=2)),
    ("zo-muon", "paper", dict(rank=8, interval=2, orthogonalizer="ns5")),
    ("zo-muon", "paper", dict(rank=8, interval=2, orthogonalizer="svd")),
    ("zo-muon", "paper", dict(rank=8, interval=2, orthogonalizer="sgd")),
    ("lozo", "paper", dict(rank=2, interval=2)),
    ("mezo", "paper", {}),
]
IDS = ["zo-mopi", "zo-mopi-released", "zo-muon-ns5", "zo-muon-svd", "zo-muon-sgd", "lozo", "mezo"]


def _losses(seed=0):
    """Slice losses that ignore the model: both runs of a comparison then see the same g_i every step."""
    gen = torch.Generator().manual_seed(seed)
    return lambda model, batch, s: 1 + torch.rand(s, generator=gen, dtype=torch.float64)


def _per_target_update(opt, g, t):
    """The update as it was before batching: Ĝ by tensordot, then each method's math on one matrix."""
    method, lr, n = opt.method, opt.config.lr, len(g)
    for target, st in zip(opt.targets, opt.state.per_target):
        grad = torch.zeros(target.probe_shape())
        for first, block in target.probe_chunks(opt.step_seed(t), n, target.device):
            grad += torch.tensordot(g.float()[first : first + len(block)] / n, block, dims=1)
        if isinstance(method, ZOMOPI):
            m = st["momentum"].mul_(method.beta).add_(grad, alpha=1 - method.beta)
            o, st["v"] = streaming_power_iteration(m, st["v"], st["v"].shape[1])
            target.right -= lr * o
        elif isinstance(method, ZOMuon):
            target.right -= lr * ORTHOGONALIZERS[method.orthogonalizer](grad)
        elif isinstance(method, LOZO):
            target.left -= (lr / target.left.shape[1]) * grad
        else:
            target.dense -= lr * grad
    opt.state.step = t + 1


def _run(name, variant, settings, steps=5, per_target=False, calls=None):
    delta = DeltaModel.attach(tiny())
    opt = make_optimizer(name, delta, seed=1, variant=variant, **settings)
    if per_target:
        opt.apply_update = lambda g, t: _per_target_update(opt, g, t)
    if calls is not None:  # record (batch size, stacked bytes) of every method.update call
        update = opt.method.update

        def spy(state, grad, lr):
            calls.append((grad.shape[0], grad.nbytes + sum(v.nbytes for v in state.values())))
            return update(state, grad, lr)

        opt.method.update = spy
    loss = _losses()
    results = [opt.step(loss, {}) for _ in range(steps)]
    return delta, opt, results


def _tensors(delta, opt):
    return {**delta.state_dict(), **{f"opt.{k}": v for k, v in opt.state_dict()["tensors"].items()}}


def _relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name,variant,settings", CASES, ids=IDS)
def test_batched_update_equals_per_target_update(name, variant, settings):
    delta, opt, results = _run(name, variant, settings)
    ref_delta, ref_opt, _ = _run(name, variant, settings, per_target=True)
    assert len({t.probe_shape() for t in delta.targets}) >= 2
    assert name == "mezo" or sum(r.refreshed for r in results) == 2  # refreshes at steps 2 and 4 in between
    ours, ref = _tensors(delta, opt), _tensors(ref_delta, ref_opt)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert _relative_error(ours[key], ref[key]) <= 1e-5, key


@pytest.mark.parametrize("name,variant,settings", CASES, ids=IDS)
def test_one_update_call_per_probe_shape(name, variant, settings):
    calls = []
    delta, _, _ = _run(name, variant, settings, steps=1, calls=calls)
    shapes = [t.probe_shape() for t in delta.targets]
    assert sorted(b for b, _ in calls) == sorted(shapes.count(s) for s in set(shapes))


@pytest.mark.parametrize("per_chunk", [1, 3])
@pytest.mark.parametrize("name,variant,settings", CASES, ids=IDS)
def test_chunked_update_is_identical_and_bounded(name, variant, settings, per_chunk, monkeypatch):
    whole = []
    delta, opt, _ = _run(name, variant, settings, calls=whole)
    b, size = max(whole)
    limit = per_chunk * size // b  # `per_chunk` targets of the largest group
    monkeypatch.setattr(base, "UPDATE_CHUNK_BYTES", limit)  # (these tests run on CPU)
    calls = []
    c_delta, c_opt, _ = _run(name, variant, settings, calls=calls)
    assert all(b == 1 or size <= limit for b, size in calls)
    assert len(calls) > len(whole)
    ours, chunked = _tensors(delta, opt), _tensors(c_delta, c_opt)
    for key in ours:
        assert torch.equal(ours[key], chunked[key]), key


# -- the per-matrix functions on a batch -----------------------------------------------------------
def _batch(shape, seed=0):
    """Three matrices of very different scales: a norm over the whole batch would show."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, *shape, generator=g) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]


@pytest.mark.parametrize("shape", [(8, 24), (24, 8)])
@pytest.mark.parametrize("fn", [newton_schulz5, svd_polar, orthonormalize])
def test_orthogonalizers_treat_each_matrix_of_a_batch_on_its_own(fn, shape):
    g = _batch(shape)
    batched = fn(g)
    for i in range(len(g)):
        assert _relative_error(batched[i], fn(g[i])) <= 1e-5


def test_power_iteration_treats_each_matrix_of_a_batch_on_its_own():
    g, v_prev = _batch((8, 24)), orthonormalize(_batch((24, 4), seed=1))
    o, v = streaming_power_iteration(g, v_prev, 3)
    for i in range(len(g)):
        o_i, v_i = streaming_power_iteration(g[i], v_prev[i], 3)
        assert _relative_error(o[i], o_i) <= 1e-5 and _relative_error(v[i], v_i) <= 1e-5
