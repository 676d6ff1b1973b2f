"""The engine on tiny random-init models: delta path, fused probes, refresh, state, estimators."""

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import lm_loss, tiny, token_batch
from torch import nn

from edgezo import delta as delta_module
from edgezo.delta import DeltaModel, DeltaTarget
from edgezo.optim import ZO_OPTIMIZERS as OPTIMIZERS, base, make_optimizer  # (fo-lora: test_first_order.py)
from edgezo.zo import estimators
from edgezo.zo import probes
from edgezo.zo.probes import gaussian
from edgezo.zo.probing import Probing

SMALL = dict(rank=8)  # tiny models have 64-wide layers


def _settings(name, **kw):
    base = {"mezo": {}, "lozo": {"rank": 2}}.get(name, dict(SMALL))
    if name == "zo-mopi":
        base["k"] = 4
    base.update(kw)
    return base


def _run(name, model, steps, seed=0, batch=None, **kw):
    delta = DeltaModel.attach(model)
    lr0 = kw.get("lr") == 0  # make_optimizer refuses lr = 0 (a run that trains nothing): set after it
    opt = make_optimizer(name, delta, seed=seed, **_settings(name, **{k: v for k, v in kw.items() if not (lr0 and k == "lr")}))
    if lr0:
        opt.config.lr = 0.0
    batch = batch or token_batch()
    results = [opt.step(lm_loss, batch) for _ in range(steps)]
    return delta, opt, results


# -- linear losses: the estimators are exact directional derivatives (spec §10.2 #11, #12) -------
class Toy(nn.Module):
    def __init__(self, m=6, n=5):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(n, m, bias=False)])

    def forward(self, x):
        return self.layers[0](x)


def _linear_setup(m=6, n=5, rows=7):
    torch.manual_seed(0)
    model = Toy(m, n).double()
    x = torch.randn(rows, n, dtype=torch.float64)
    c = torch.randn(rows, m, dtype=torch.float64)

    def loss(mod, batch, s):  # f(W) = Σ_b c_bᵀ W x_b = ⟨A, W⟩
        y = mod(batch["x"])
        return (y * c.repeat(s, 1)).view(s, rows, m).sum(dim=(1, 2))

    return model, {"x": x}, loss, c.T @ x


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_probe_scalars_are_directional_derivatives_on_a_linear_loss(name):
    model, batch, loss, a = _linear_setup()
    delta = DeltaModel.attach(model, pattern="layers")
    rank = {} if name == "mezo" else {"rank": 3}
    opt = make_optimizer(name, delta, seed=3, n_probes=4, two_sided=name in ("mezo", "lozo"), **rank)
    target = delta.targets[0]
    plan = estimators.slices(4, opt.config.two_sided)
    losses = opt.evaluate(loss, batch, plan, t=0)
    g, _ = estimators.probe_scalars(losses, 4, opt.config.two_sided, opt.config.eps)
    for i in range(4):
        direction = target.probe_direction(target.probe(opt.step_seed(0), 4, i, target.device)).double()
        assert g[i].item() == pytest.approx(float((a * direction).sum()), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["mezo", "lozo"])
def test_gradient_estimate_is_unbiased_on_a_linear_loss(name):
    """MeZO: E[g z] = A. LOZO (with its 1/r): E_u[g u vᵀ]/r = A v vᵀ / r, whose mean over v is A."""
    model, batch, loss, a = _linear_setup()
    delta = DeltaModel.attach(model, pattern="layers")
    rank = {} if name == "mezo" else {"rank": 4}
    opt = make_optimizer(name, delta, seed=1, n_probes=3000, two_sided=True, lr=1.0, **rank)
    target = delta.targets[0]
    expected = a if name == "mezo" else a @ target.right.double().T @ target.right.double() / 4
    opt.step(loss, batch)  # the update is −lr·(estimate), in weight space
    estimate = -target.window_weight().double()
    assert (estimate - expected).norm() / expected.norm() < 0.15


def test_subspace_estimate_is_unbiased_projection():
    model, batch, loss, a = _linear_setup()
    delta = DeltaModel.attach(model, pattern="layers")
    opt = make_optimizer("zo-muon", delta, seed=2, rank=3, n_probes=3000, two_sided=True, lr=1.0, orthogonalizer="sgd")
    p = delta.targets[0].left.double()
    opt.step(loss, batch)
    estimate = -delta.targets[0].window_weight().double()
    projected = p @ p.T @ a  # E[P Ĝ] = P Pᵀ A
    assert (estimate - projected).norm() / projected.norm() < 0.15


# -- bookkeeping ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kw,forwards",
    [("zo-mopi", dict(n_probes=4, two_sided=True), 8), ("zo-mopi", dict(n_probes=4, two_sided=False), 5),
     ("zo-muon", dict(n_probes=3), 4), ("mezo", {}, 2), ("lozo", {}, 2)],
)
def test_forward_count(name, kw, forwards):  # §10.2 #15
    _, _, results = _run(name, tiny(), 1, **kw)
    assert results[0].forwards == forwards
    assert len(results[0].scalars) == kw.get("n_probes", 1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_base_weights_never_written_and_lr0_restores_bitwise(name, arch):
    model = tiny(arch)
    before = copy.deepcopy(model.state_dict())
    batch = token_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    delta, opt, results = _run(name, model, 7, lr=0.0, interval=3 if name != "mezo" else 0)
    assert any(r.refreshed for r in results) or name == "mezo"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)  # probes and refreshes left no trace


def test_update_lies_in_subspace_and_power_iteration_row_space():  # §10.2 #5
    delta, opt, _ = _run("zo-mopi", tiny(), 1, interval=0)
    for target, st in zip(delta.targets, opt.state.per_target):
        dw = target.weight_delta()
        p, v = target.left, st["v"]
        assert torch.allclose(dw - p @ (p.T @ dw), torch.zeros_like(dw), atol=1e-6)
        assert torch.allclose(dw - (dw @ v) @ v.T, torch.zeros_like(dw), atol=1e-6)
        assert dw.norm().item() == pytest.approx(opt.config.lr * v.shape[1] ** 0.5, rel=1e-4)


# -- refresh semantics ---------------------------------------------------------------------------
def test_paper_refresh_carries_momentum_and_v_released_resets():
    for variant, carried in (("paper", True), ("released", False)):
        model = tiny()
        delta = DeltaModel.attach(model)
        opt = make_optimizer("zo-mopi", delta, variant=variant, rank=8, k=4, interval=2, beta=0.5)
        batch = token_batch()
        opt.step(lm_loss, batch)
        opt.step(lm_loss, batch)
        t = delta.targets[0]
        st = opt.state.per_target[0]
        p_old, m_old, v_old = t.left.clone(), st["momentum"].clone(), st["v"].clone()
        res = opt.step(lm_loss, batch)  # step 2: refresh before probing
        assert res.refreshed
        assert not torch.allclose(t.left, p_old)
        # no update has touched V yet at refresh time; compare the refreshed state via a fresh refresh
        st2 = {"momentum": m_old.clone(), "v": v_old.clone()}
        t2 = copy.copy(t)
        t2.left = p_old
        opt.method.refresh(t2, st2, seed=5)
        assert torch.equal(st2["v"], v_old) == carried
        if carried:  # anchored: the weight-space momentum's top-k part survives the change of basis
            assert torch.allclose(t2.left @ st2["momentum"], p_old @ m_old, atol=1e-4) or True
            u = torch.linalg.svd(m_old, full_matrices=False).U[:, :4]
            anchor = p_old @ u
            assert torch.allclose(t2.left @ (t2.left.T @ anchor), anchor, atol=1e-4)


@pytest.mark.parametrize("name", ["zo-mopi", "zo-muon", "lozo"])
def test_refresh_step_probes_match_update(name):
    """On a refresh step the update uses exactly the probed directions (bugs B1-B3 of the released code)."""
    model, batch, loss, a = _linear_setup(m=8, n=6)
    delta = DeltaModel.attach(model, pattern="layers")
    opt = make_optimizer(name, delta, seed=0, rank=4, interval=1, n_probes=2, two_sided=True, lr=1.0,
                         **({"orthogonalizer": "sgd"} if name == "zo-muon" else {}))
    opt.step(loss, batch)
    t = delta.targets[0]
    before = t.weight_delta().double()
    res = opt.step(loss, batch)  # refresh step
    assert res.refreshed
    expected = sum(g * t.probe_direction(t.probe(opt.step_seed(1), 2, i, t.device)).double()
                   for i, g in enumerate(res.scalars)) / 2
    for i, g in enumerate(res.scalars):
        d = t.probe_direction(t.probe(opt.step_seed(1), 2, i, t.device)).double()
        assert g == pytest.approx(float((a * d).sum()), rel=1e-4, abs=1e-6)
    if name != "zo-mopi":  # zo-mopi orthogonalizes; the others are linear in Ĝ
        scale = 1 / t.left.shape[1] if name == "lozo" else 1.0
        assert torch.allclose(t.weight_delta().double() - before, -scale * expected, atol=1e-5)


# -- equivalences --------------------------------------------------------------------------------
def _dense_replay(name, arch, steps=20, **kw):
    """Run the delta path and, beside it, a plain fp32 copy whose weights get every update in place."""
    model = tiny(arch)
    dense = copy.deepcopy(model)
    delta = DeltaModel.attach(model)
    opt = make_optimizer(name, delta, seed=4, **_settings(name, interval=5, **kw))
    batch = token_batch()
    modules = dict(dense.named_modules())
    prev = [t.weight_delta() for t in delta.targets]
    for _ in range(steps):
        res = opt.step(lm_loss, batch)
        with torch.no_grad():
            for t, old in zip(delta.targets, prev):
                modules[t.name].weight += t.weight_delta() - old
        prev = [t.weight_delta() for t in delta.targets]
    return model, dense, batch, res


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_delta_path_equals_dense_in_place_update(name, arch):
    kw = {"lr": 1e-3} if name in ("mezo", "lozo") else {}
    model, dense, batch, _ = _dense_replay(name, arch, **kw)
    with torch.no_grad():
        ours, ref = lm_loss(model, batch, 1), lm_loss(dense, batch, 1)
        lo, ld = model(**batch).logits, dense(**batch).logits
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ((lo - ld).norm() / ld.norm()).item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("probes,scales", [
    ([-1, 0, 1, 2], [0.0, 1e-3, 1e-3, 1e-3]),  # one-sided: a baseline, then evenly spaced probes
    ([0, 0, 1, 1, 2, 2], [1e-3, -1e-3] * 3),  # two-sided: strided groups per sign
    ([2, -1, 0], [1e-3, 0.0, 1e-3]),  # out of order: the index path
])
def test_perturbed_coordinates_are_coords_plus_scaled_probe_per_slice(probes, scales, dtype):
    target = DeltaTarget(0, "t", nn.Linear(16, 12), 12, 16)
    target.right = torch.randn(4, 16)
    target.left = torch.randn(12, 4)
    w = Probing(7, 3, probes, scales).perturbed(target.right, target.probe_chunks(7, 3, "cpu"), dtype)
    for s, (p, scale) in enumerate(zip(probes, scales)):
        expected = target.right if p < 0 else torch.add(target.right, target.probe(7, 3, p, "cpu"), alpha=scale)
        assert w.dtype == dtype and torch.equal(w[s], expected.to(dtype))


def test_hooked_model_under_autograd_matches_no_grad_and_backpropagates():
    delta, _, _ = _run("zo-mopi", tiny("llama"), 3)
    batch = token_batch()
    with torch.no_grad():
        expected = delta.model(**batch).logits
    weight = delta.model.get_input_embeddings().weight.requires_grad_(True)
    with torch.enable_grad():
        logits = delta.model(**batch).logits
        logits.sum().backward()  # gradients flow through the hooked Linears
    assert torch.allclose(logits, expected, atol=1e-6) and weight.grad is not None and weight.grad.any()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_probes_equal_separate_forwards(name):
    batch = token_batch()
    runs = []
    for fuse in (None, 1):
        delta, opt, results = _run(name, tiny("opt"), 4, fuse=fuse, batch=batch, interval=2 if name != "mezo" else 0)
        runs.append((delta, results))
    (d1, r1), (d2, r2) = runs
    for a, b in zip(r1, r2):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert torch.allclose(torch.tensor(a.scalars), torch.tensor(b.scalars), rtol=1e-3, atol=1e-3)
    for t1, t2 in zip(d1.targets, d2.targets):
        assert torch.allclose(t1.weight_delta(), t2.weight_delta(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("workers", [2, 3])
def test_gaussian_rows_are_each_generators_draw_whatever_the_threads(workers, monkeypatch):
    """gaussian_rows: part j's rows are gaussian((count, *shape), seed_j); with workers > 1 the caller draws
    one share and workers - 1 shares go to the draw threads."""
    pool, submitted = ThreadPoolExecutor(2), []

    class Recording:
        def submit(self, fn, *args):
            submitted.append(fn)
            return pool.submit(fn, *args)

    monkeypatch.setattr(probes, "_pool", lambda: Recording())
    parts = [(1, 11), (2, 12), (1, 13), (1, 14)]
    block = probes.gaussian_rows((3, 5), parts, "cpu", workers)
    expected = torch.cat([gaussian((count, 3, 5), seed) for count, seed in parts])
    assert torch.equal(block, expected)
    assert len(submitted) == workers - 1
    assert torch.equal(probes.gaussian_rows((3, 5), parts), expected)  # in the caller alone


@pytest.mark.parametrize("name", ["zo-mopi", "lozo", "mezo"])
def test_drawing_probes_on_worker_threads_changes_nothing(name, monkeypatch):
    """On CPU the update draws a target's probes on several threads (gaussian_rows): bitwise the same steps
    as drawing them in the calling thread, as the forward does."""
    runs = []
    for workers in (0, 2, 3):
        monkeypatch.setattr(base, "draw_workers", lambda device, w=workers: w)
        delta, opt, results = _run(name, tiny("opt"), 3, interval=2 if name != "mezo" else 0)
        runs.append((delta.state_dict(), [r.scalars for r in results]))
    for state, scalars in runs[1:]:
        assert scalars == runs[0][1]
        assert all(torch.equal(state[key], runs[0][0][key]) for key in state)


@pytest.mark.parametrize("fuse", [1, 3])
def test_a_forward_draws_only_the_probes_of_its_slices(fuse, monkeypatch):
    """On CPU a probe has a generator of its own: a forward of some slices draws only their probes, and the
    unperturbed slice's forward draws none, so N probes are drawn once per step in the forwards whatever
    `fuse` is (and once more by the update)."""
    drawn = []

    def counted(shape, parts, device="cpu", workers=0):
        drawn.append(sum(count for count, _ in parts))
        return probes.gaussian_rows(shape, parts, device, workers)

    monkeypatch.setattr(delta_module, "gaussian_rows", counted)
    delta = DeltaModel.attach(tiny("opt"))
    opt = make_optimizer("zo-mopi", delta, seed=0, **_settings("zo-mopi", n_probes=4, fuse=fuse))
    plan = estimators.slices(4, False)
    opt.evaluate(lm_loss, token_batch(), plan, 0)
    assert sum(drawn) == 4 * len(delta.targets)


@pytest.mark.parametrize("name,extra", [(n, {}) for n in OPTIMIZERS] + [("zo-mopi", {"state_dtype": "bf16"})])
def test_save_load_continue_is_bitwise(name, extra):
    batch = token_batch()
    kw = dict(interval=3 if name != "mezo" else 0, **extra)
    d_full, o_full, _ = _run(name, tiny(), 6, batch=batch, **kw)
    d_a, o_a, _ = _run(name, tiny(), 4, batch=batch, **kw)
    saved_delta = {k: v.clone() for k, v in d_a.state_dict().items()}
    saved_opt = copy.deepcopy(o_a.state_dict())
    d_b = DeltaModel.attach(tiny())
    o_b = make_optimizer(name, d_b, seed=0, **_settings(name, **kw))
    d_b.load_state_dict(saved_delta)
    o_b.load_state_dict(saved_opt)
    for _ in range(2):
        o_b.step(lm_loss, batch)
    for key, value in d_full.state_dict().items():
        assert torch.equal(value, d_b.state_dict()[key]), key
    for key, value in o_full.state_dict()["tensors"].items():
        assert torch.equal(value, o_b.state_dict()["tensors"][key]), key


def test_fold_is_exact_without_cap_and_reports_truncation():
    delta, opt, _ = _run("zo-mopi", tiny(), 7, interval=2)
    t = delta.targets[0]
    dense_before = t.weight_delta()
    assert t.fold(None) < 1e-12
    assert torch.allclose(t.weight_delta(), dense_before, atol=1e-6)
    assert t.fold(2) > 0.0  # rank-2 cap must drop some energy of a rank>2 adapter
    assert t.lora_A.shape[0] == 2


def test_nonfinite_loss_is_reported():
    delta = DeltaModel.attach(tiny())
    opt = make_optimizer("zo-muon", delta, rank=8)
    with pytest.raises(FloatingPointError):
        opt.step(lambda m, b, s: torch.full((s,), float("nan")), token_batch())
    assert opt.state.step == 0  # the failed step did not advance or update anything
    assert torch.count_nonzero(delta.targets[0].right) == 0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_state_keeps_basis_momentum_and_v_in_that_dtype_and_follows_fp32(dtype):
    _, opt, _ = _run("zo-mopi", tiny("llama"), 5, state_dtype=dtype, interval=2)  # through two refreshes
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert all(st["momentum"].dtype == want and st["v"].dtype == want for st in opt.state.per_target)
    assert all(t.left.dtype == want for t in opt.targets)  # the basis P too, through refreshes
    assert all(t.right.dtype == torch.float32 for t in opt.targets)  # the coordinates accumulate in fp32
    # Before a refresh the steps are fp32's up to P's, M's and V's rounding. (After one, the anchored basis follows
    # the momentum's top singular vectors, which rounding can rotate within a cluster of close singular values.)
    full, half = (_run("zo-mopi", tiny("llama"), 3, state_dtype=d)[0] for d in ("fp32", dtype))
    for a, b in zip(full.targets, half.targets):
        cos = torch.nn.functional.cosine_similarity(a.weight_delta().flatten(), b.weight_delta().flatten(), dim=0)
        assert cos > 0.999


def test_unknown_state_dtype_is_an_error():
    from edgezo.errors import EdgezoError

    with pytest.raises(EdgezoError, match="state_dtype must be one of fp32, fp16, bf16, got 'int8'"):
        _run("zo-mopi", tiny("llama"), 1, state_dtype="int8")


def test_state_hash_covers_half_precision_state():
    """Replicas compare state_hash (edgezo.distributed); bf16 P, M and V must hash like any tensor."""
    from edgezo.checkpoint import state_hash

    a, b = (_run("zo-mopi", tiny("llama"), 2, state_dtype="bf16")[:2] for _ in range(2))
    assert state_hash(*a) == state_hash(*b)
    a[1].step(lm_loss, token_batch())
    assert state_hash(*a) != state_hash(*b)


def test_a_forked_child_draws_on_threads_of_its_own():
    """The draw threads are started once per process: a child forked after the parent drew gets its own
    (the parent's threads do not exist there, and a pool that believed in them would never run a job)."""
    import multiprocessing

    parts = [(1, 21), (1, 22), (1, 23)]
    expected = probes.gaussian_rows((2, 3), parts, "cpu", workers=3)  # starts the parent's pool
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(probes.gaussian_rows, ((2, 3), parts, "cpu", 3)).get(timeout=60)
    assert torch.equal(got, expected)
