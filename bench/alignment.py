"""Why one ZO method learns faster than another: how well its update points along the true gradient.

    python bench/alignment.py                 # SmolLM2 GGUF, tweet sentiment, CPU (a few minutes)

The exact gradients ∇_b of the classification loss with respect to the target Linears are taken by backprop
on a few real batches (SmolLM2-135M-Instruct, the task of bench/convergence.py). Each method's update rule is
then run for --steps steps on those gradients with the finite differences replaced by their limit ε → 0,
g_i = ⟨∇_b, z_i⟩, batch b = step mod --batches: what is left is the estimator's own noise and what its
orthogonalization and momentum do to it. Reported per method: the mean cosine between a step's update ΔW and
the mean gradient ∇̄ (over all targets together, second half of the steps) and cos² per forward: with the best
constant step size, the first-order loss decrease per step is proportional to cos²·‖∇̄‖²/L, so cos²/forwards
ranks the methods by loss decrease per forward pass. The LAST line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.convergence import LABEL_WORDS, TEMPLATE  # noqa: E402
from bench.sentiment_data import build_sentiment_task  # noqa: E402
from edgezo import data as D  # noqa: E402
from edgezo.delta import DEFAULT_TARGETS  # noqa: E402
from edgezo.runtime.load import find_demo_gguf, load_model, resolve_folder  # noqa: E402
from edgezo.optim import ZOMOPI, ZOMuon  # noqa: E402
from edgezo.zo.subspace import haar_basis, orthonormalize  # noqa: E402


@dataclass(frozen=True)
class Rule:
    """One update rule: a method's own `update` on the subspace coordinates Ĝ (r×n), or, with `method` None,
    Ĝ itself (after a β momentum if `beta`). MeZO's rule is Ĝ in the full space."""

    name: str
    space: str  # "subspace" (P·u probes, r=64) or "full" (MeZO)
    n_probes: int
    forwards: int  # per step
    method: ZOMOPI | ZOMuon | None = None
    beta: float = 0.0


RULES = [
    Rule("mezo", "full", 1, 2),
    Rule("subspace zo-sgd (N=4)", "subspace", 4, 5),
    Rule("zo-muon (N=4, ns5)", "subspace", 4, 5, ZOMuon()),
    Rule("zo-mopi (N=8, k=32, β=0.9)", "subspace", 8, 9, ZOMOPI()),
    Rule("zo-mopi k=8", "subspace", 8, 9, ZOMOPI(k=8)),
    Rule("zo-mopi k=64", "subspace", 8, 9, ZOMOPI(k=64)),
    Rule("zo-mopi β=0", "subspace", 8, 9, ZOMOPI(beta=0.0)),
    Rule("zo-mopi N=4", "subspace", 4, 5, ZOMOPI()),
    Rule("zo-mopi N=16", "subspace", 16, 17, ZOMOPI()),
    Rule("zo-mopi β=0.9 sgd (no orth.)", "subspace", 8, 9, beta=0.9),
]


def gradients(args) -> tuple[list[str], list[list[torch.Tensor]]]:
    """∇_W of the loss for the targets in every --layer-step-th block, one list per batch."""
    loaded = load_model(str(resolve_folder(args.model or find_demo_gguf())), "fp32", "cpu")
    data_dir = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="edgezo-sentiment-"))
    if not (data_dir / "train.jsonl").is_file():
        build_sentiment_task(data_dir)
    task = D.load_task_data(data_dir / "train.jsonl", loaded.tokenizer, "classify", max_length=128,
                            label_words=LABEL_WORDS, template=TEMPLATE, eval_path=data_dir / "test.jsonl")
    model, loss_fn = loaded.model, D.make_loss(task)
    rx, layer = re.compile(DEFAULT_TARGETS), re.compile(r"layers\.(\d+)\.")
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.search(n)
             and int(layer.search(n).group(1)) % args.layer_step == 0]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in named:
        m.weight.requires_grad_(True)
    grads = []
    for b in range(args.batches):
        batch = D.batch_at(task, args.batch_size, 0, b)
        with torch.enable_grad():
            loss = loss_fn(model, batch, 1)[0]
            loss.backward()
        grads.append([m.weight.grad.detach().clone() for _, m in named])
        for _, m in named:
            m.weight.grad = None
        print(f"batch {b}: loss {loss.item():.4f}", flush=True)
    return [n for n, _ in named], grads


def simulate(rule: Rule, grads: list[list[torch.Tensor]], mean: list[torch.Tensor], steps: int, seed: int,
             rank: int = 64) -> list[float]:
    """cos(ΔW_t, ∇̄) of every step, over all targets together."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [g.shape for g in mean]
    bases = [haar_basis(m, min(rank, m), seed + i) for i, (m, _) in enumerate(shapes)]
    momenta = [torch.zeros(p.shape[1], n) for p, (_, n) in zip(bases, shapes)]
    k = rule.method.k if isinstance(rule.method, ZOMOPI) else 32
    # ZO-MOPI's state as ZOMOPI.init lays it out; every rule draws V, so all start their probes at one place
    states = [{"momentum": mom, "v": orthonormalize(torch.randn(n, min(k, p.shape[1]), generator=gen))}
              for mom, p, (_, n) in zip(momenta, bases, shapes)]
    norm_mean = torch.sqrt(sum((g * g).sum() for g in mean))
    out = []
    for t in range(steps):
        dot = sq = 0.0
        for i, grad in enumerate(grads[t % len(grads)]):
            if rule.space == "full":
                z = torch.randn(rule.n_probes, *grad.shape, generator=gen)
                upd = torch.einsum("p,pmn->mn", torch.einsum("pmn,mn->p", z, grad), z) / rule.n_probes
            else:
                p = bases[i]
                u = torch.randn(rule.n_probes, p.shape[1], grad.shape[1], generator=gen)
                g_hat = torch.einsum("p,prn->rn", torch.einsum("prn,rn->p", u, p.T @ grad), u) / rule.n_probes
                if rule.method is not None:  # the shipped update, lr 1: the step's direction
                    g_hat = rule.method.update(states[i], g_hat, 1.0)
                elif rule.beta:
                    momenta[i] = rule.beta * momenta[i] + (1 - rule.beta) * g_hat
                    g_hat = momenta[i]
                upd = p @ g_hat
            dot += float((upd * mean[i]).sum())
            sq += float((upd * upd).sum())
        out.append(dot / (sq**0.5 * float(norm_mean) + 1e-30))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="GGUF or HF folder (default: the demo SmolLM2 GGUF)")
    ap.add_argument("--data", help="folder with train/test.jsonl (built there if missing)")
    ap.add_argument("--batches", type=int, default=3, help="real batches whose gradients the steps cycle through")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layer-step", type=int, default=3, help="targets of every n-th decoder block")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names, grads = gradients(args)
    mean = [torch.stack(gs).mean(0) for gs in zip(*grads)]
    between = [float(torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in a]),
                                                           torch.cat([g.flatten() for g in mean]), dim=0))
               for a in grads]
    print(f"{len(names)} targets, {sum(g.numel() for g in mean) / 1e6:.1f}M weights; cos(∇_b, ∇̄) per batch "
          f"{[round(c, 3) for c in between]}")
    print(f"\n{'rule':<32}{'fwd/step':>9}{'mean cos':>11}{'cos²/fwd ×1e6':>15}")
    result = {}
    for rule in RULES:
        half = args.steps // 2
        cos = [sum(simulate(rule, grads, mean, args.steps, s)[half:]) / (args.steps - half) for s in range(args.seeds)]
        c = sum(cos) / len(cos)
        result[rule.name] = {"cos": round(c, 5), "cos2_per_forward_e6": round(1e6 * c * c / rule.forwards, 2)}
        print(f"{rule.name:<32}{rule.forwards:>9}{c:>11.4f}{1e6 * c * c / rule.forwards:>15.2f}", flush=True)
    print(json.dumps({"targets": len(names), "steps": args.steps, "batches": args.batches, "rules": result}))


if __name__ == "__main__":
    main()
