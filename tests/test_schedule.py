"""Learning-rate schedules, ZO-MOPI's norm-adaptive step and the lr="auto" probe."""

import math

import pytest
import torch
from conftest import lm_loss, tiny, token_batch
from torch import nn

from edgezo import lr_probe
from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.optim import make_optimizer, schedule


def test_schedule_factors():
    assert [schedule.factor(t, "constant", 0, 10) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [schedule.factor(t, "cosine", 4, 14) for t in (0, 1, 3)] == [0.25, 0.5, 1.0]  # warmup, then full
    assert schedule.factor(4, "cosine", 4, 14) == 1.0
    assert schedule.factor(9, "cosine", 4, 14) == pytest.approx(0.5)  # halfway through the decay
    assert schedule.factor(9, "linear", 4, 14) == pytest.approx(0.5)
    assert schedule.factor(13, "linear", 4, 14) == pytest.approx(0.1)  # the last step still moves
    assert schedule.factor(20, "cosine", 0, 14) == 0.0
    cos = [schedule.factor(t, "cosine", 0, 50) for t in range(50)]
    assert all(a > b for a, b in zip(cos, cos[1:]))


@pytest.mark.parametrize("kw", [dict(schedule="step"), dict(schedule="cosine"), dict(warmup=-1),
                                dict(schedule="linear", warmup=10, horizon=10)])
def test_bad_schedule_is_one_clear_error(kw):
    with pytest.raises(EdgezoError, match="schedule|warmup"):
        make_optimizer("zo-mopi", DeltaModel.attach(tiny()), rank=8, k=4, **kw)


@pytest.mark.parametrize("name", ["zo-mopi", "mezo"])
def test_scheduled_step_moves_by_the_scheduled_rate(name):
    """Step t of a cosine run equals step t of a constant run at lr_at(t) (the factor reaches the update)."""
    kw = dict(rank=8, k=4) if name == "zo-mopi" else {}
    batch, lr = token_batch(), 1e-2
    sched = make_optimizer(name, DeltaModel.attach(tiny()), lr=lr, schedule="cosine", warmup=2, horizon=6, **kw)
    for t in range(4):
        sched.step(lm_loss, batch)
    expected = sched.lr_at(4)
    assert expected == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    before = [t.coords().clone() for t in sched.targets]
    const = make_optimizer(name, DeltaModel.attach(tiny()), lr=expected, **kw)
    const.delta.load_state_dict(sched.delta.state_dict())
    const.load_state_dict(sched.state_dict())
    sched.step(lm_loss, batch)
    const.step(lm_loss, batch)
    for a, b, start in zip(sched.targets, const.targets, before):
        assert not torch.equal(a.coords(), start)
        torch.testing.assert_close(a.coords(), b.coords())


# -- the norm-adaptive ZO-MOPI step on a quadratic -------------------------------------------------
class Toy(nn.Module):
    def __init__(self, m=16, n=12):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(n, m, bias=False)])

    def forward(self, x):
        return self.layers[0](x)


def _quadratic_run(adaptive: bool, lr: float, steps: int):
    """f(W) = ½‖(W − W*) x‖² / rows, W* full rank: (step norms, losses) of ZO-MOPI with r = m."""
    torch.manual_seed(0)
    model = Toy().double()
    x = torch.randn(32, 12, dtype=torch.float64)
    y = x @ (model.layers[0].weight.detach() + torch.randn(16, 12, dtype=torch.float64)).T

    def loss(mod, batch, s):
        return 0.5 * ((mod(batch["x"]).view(s, 32, 16) - y) ** 2).sum(dim=(1, 2)) / 32

    delta = DeltaModel.attach(model, pattern="layers")
    opt = make_optimizer("zo-mopi", delta, seed=0, rank=16, k=8, interval=0, lr=lr, adaptive=adaptive)
    norms, losses = [], []
    for _ in range(steps):
        before = delta.targets[0].coords().clone()
        losses.append(opt.step(loss, {"x": x}).loss)
        norms.append(float((delta.targets[0].coords() - before).norm()))
    return norms, losses


def test_adaptive_step_shrinks_with_the_gradient_and_converges_where_fixed_norm_oscillates():
    lr, steps = 0.1, 400
    fixed_norms, fixed = _quadratic_run(False, lr, steps)
    norms, losses = _quadratic_run(True, lr, steps)
    assert fixed_norms == pytest.approx([lr * 8 ** 0.5] * steps, rel=1e-4)  # η√k, whatever the gradient
    assert min(fixed[-100:]) > 5.0  # stuck bouncing (from 98 at the start)
    assert norms[0] == pytest.approx(fixed_norms[0], rel=1e-4)  # full size while the momentum grows
    assert norms[-1] < 0.15 * norms[0]  # the step fades with the gradient ...
    assert losses[-1] < 0.3 * min(fixed[-100:])  # ... and gets where the fixed step cannot
    assert max(losses[-50:]) < 0.5 * min(fixed[-100:])


def test_adaptive_state_is_saved_and_resumes_bitwise():
    batch = token_batch()
    kw = dict(rank=8, k=4, interval=3, adaptive=True, lr=5e-2)
    a = make_optimizer("zo-mopi", DeltaModel.attach(tiny()), seed=1, **kw)
    for _ in range(4):
        a.step(lm_loss, batch)
    sd = a.state_dict()
    assert any(k.endswith("norm_avg") for k in sd["tensors"]) and any(k.endswith("norm_max") for k in sd["tensors"])
    b = make_optimizer("zo-mopi", DeltaModel.attach(tiny()), seed=1, **kw)
    b.delta.load_state_dict(a.delta.state_dict())
    b.load_state_dict(sd)
    assert_same_steps(a, b, batch, 3)


def assert_same_steps(a, b, batch, steps: int) -> None:
    """Both optimizers take `steps` steps on `batch` and end with bitwise the same factors."""
    for _ in range(steps):
        a.step(lm_loss, batch)
        b.step(lm_loss, batch)
    for x, y in zip(a.targets, b.targets):
        assert torch.equal(x.coords(), y.coords())


# -- lr auto ---------------------------------------------------------------------------------------
def test_probe_picks_the_best_rate_and_restores_the_state_exactly():
    batch = token_batch()
    batches, held = [batch] * 3, batch  # (random tokens: only the trained rows can show learning)
    opt = make_optimizer("zo-mopi", DeltaModel.attach(tiny()), seed=0, rank=8, k=4)
    start = {k: v.clone() for k, v in opt.delta.state_dict().items()}
    found = lr_probe.probe_lr(opt, lm_loss, batches, held, [1e-4, 3e-2, 3e-1])
    assert found.scores[1e-4] > found.scores[found.lr]  # a rate that moves beats one that does not
    assert found.lr == opt.config.lr == min(found.scores, key=found.scores.get)
    assert len(set(found.scores.values())) == 3
    assert found.forwards == 3 * 3 * 5 + 3  # 3 rates × 3 steps × (N=4)+1 forwards, one held-out forward each
    assert opt.state.step == 0
    for key, value in opt.delta.state_dict().items():
        assert torch.equal(value, start[key]), key
    # the run after the probe is the run at the chosen rate from the start, bitwise
    ref = make_optimizer("zo-mopi", DeltaModel.attach(tiny()), seed=0, rank=8, k=4, lr=found.lr)
    assert_same_steps(opt, ref, batch, 2)


def test_a_rate_whose_loss_turns_non_finite_scores_inf():
    opt = make_optimizer("zo-mopi", DeltaModel.attach(tiny()), seed=0, rank=8, k=4)

    def loss(model, batch, s):  # finite at the start, NaN once the step has moved the factors far
        far = opt.targets[0].coords().abs().max() > 1.0
        return lm_loss(model, batch, s) * (float("nan") if far else 1.0)

    found = lr_probe.probe_lr(opt, loss, [token_batch()] * 2, token_batch(), [1e-3, 1e3])
    assert math.isinf(found.scores[1e3]) and found.lr == 1e-3


def test_candidates_are_a_grid_around_the_default():
    assert lr_probe.candidates("zo-mopi") == pytest.approx([1e-2, 3e-2, 9e-2])
