"""Does the engine learn? A teacher–student task where the answer is known (issue: ZO-MOPI vs MeZO).

The student is the teacher with a random rank-2 change (30% of each weight's norm) in each decoder
Linear; the loss is the KL divergence to the teacher's next-token distribution. At an equal number of
forward passes, ZO-MOPI must lower it more than MeZO, on each of 3 seeds. Settings come from a sweep
at seed 0 (docs/defaults.md): MeZO at its best lr of {3e-6, 1e-5, 3e-5, 1e-4}; ZO-MOPI at its best
of lr {3e-2, 6e-2} × k {8, 16} × β {0, 0.9} (β = 0.9 was clearly worse here: 0.69 vs 0.44 at k = 8).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, token_batch

from edgezo.delta import DeltaModel
from edgezo.optim import make_optimizer
from edgezo.runtime.synthetic import make_model

FORWARDS = 400
SETTINGS = {
    "zo-mopi": dict(lr=3e-2, rank=16, k=16, beta=0.0, n_probes=8, two_sided=False, interval=20),
    "mezo": dict(lr=1e-5),
}


def _teacher_student(seed: int):
    teacher = make_model("llama", vocab_size=VOCAB, seed=seed, hidden_size=256, intermediate_size=512)
    with torch.no_grad():
        teacher.lm_head.weight *= 8  # a confident teacher: a sharp distribution to match
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, mod in student.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                change = torch.randn(mod.out_features, 2, generator=g) @ torch.randn(2, mod.in_features, generator=g)
                mod.weight += 0.3 * mod.weight.norm() * change / change.norm()
    batch = token_batch(batch=8, length=16, seed=seed)
    with torch.no_grad():
        target = F.log_softmax(teacher(**batch).logits.float(), -1)

    def kl(model, b, num_slices):
        logp = F.log_softmax(model(**b).logits.float(), -1)
        t = target.repeat(num_slices, 1, 1)
        return (t.exp() * (t - logp)).sum(-1).view(num_slices, -1).mean(1)

    return student, batch, kl


def _final_kl(name: str, seed: int) -> tuple[float, float]:
    student, batch, kl = _teacher_student(seed)
    opt = make_optimizer(name, DeltaModel.attach(student), seed=seed, **SETTINGS[name])
    forwards, first = 0, None
    while forwards < FORWARDS:
        result = opt.step(kl, batch)
        forwards += result.forwards
        first = result.loss if first is None else first
    with torch.no_grad():
        return first, kl(student, batch, 1).item()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zo_mopi_beats_mezo_at_equal_forwards(seed):
    torch.set_num_threads(1)
    start, mopi = _final_kl("zo-mopi", seed)
    _, mezo = _final_kl("mezo", seed)
    assert mopi < start  # it learns
    assert mopi < mezo, f"ZO-MOPI {mopi:.4f} vs MeZO {mezo:.4f} after {FORWARDS} forwards (start {start:.4f})"
