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

    python bench/alignment.py --diagnose      # issue 15: where the plateau comes from (docs/convergence.md)

--diagnose measures instead, on the same backprop gradients (ε → 0 again): (a) the estimator's noise floor,
‖E ΔW‖ / E‖ΔW‖ of ZO-MOPI's and ZO-Muon's step at their default lr over --draws probe draws, for several N;
(b) how much of the first-order gradient G of each Linear lies in ZO-MOPI's basis P, ‖Pᵀ G‖ / ‖G‖ against
the random-subspace √(r/m), at the start and after --windows anchored refreshes of a ZO-MOPI run; (c) each
decoder layer's share of the gradient's squared norm.
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
from edgezo.optim import DEFAULTS  # noqa: E402
from edgezo.zo.subspace import anchored_basis, haar_basis, orthonormalize, reproject  # noqa: E402


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


# ---------------------------------------------------------------- --diagnose (issue 15)


def _subspace_step(method, state: dict, p: torch.Tensor, grad: torch.Tensor, n_probes: int, lr: float,
                   gen: torch.Generator) -> torch.Tensor:
    """One ε → 0 step of a subspace method on gradient `grad` (m×n): its ΔW = P·update (lr included)."""
    u = torch.randn(n_probes, p.shape[1], grad.shape[1], generator=gen)
    g_hat = torch.einsum("p,prn->rn", torch.einsum("prn,rn->p", u, p.T @ grad), u) / n_probes
    stacked = {k: v.unsqueeze(0) for k, v in state.items()}
    step = method.update(stacked, g_hat.unsqueeze(0), lr)[0]
    state.update({k: v[0] for k, v in stacked.items()})
    return p @ step


def _fresh_state(method, p: torch.Tensor, n: int, gen: torch.Generator) -> dict:
    if not isinstance(method, ZOMOPI):
        return {}
    k = min(method.k, p.shape[1], n)
    return {"momentum": torch.zeros(p.shape[1], n), "v": orthonormalize(torch.randn(n, k, generator=gen))}


def noise_floor(method, lr: float, n_probes: int, grads: list[list[torch.Tensor]], mean: list[torch.Tensor],
                warm: int, draws: int, seed: int = 0) -> dict:
    """(a) ‖E ΔW‖ / E‖ΔW‖ of the step after `warm` steps on the batch gradients (a ZO-MOPI momentum in
    steady state), the mean over `draws` independent probe streams on one basis; and cos(E ΔW, ∇̄)."""
    bases = [haar_basis(g.shape[0], min(64, g.shape[0]), seed + i) for i, g in enumerate(mean)]
    total = [torch.zeros_like(g) for g in mean]
    single = 0.0
    for d in range(draws):
        gen = torch.Generator().manual_seed(1000 * seed + d)
        states = [_fresh_state(method, p, g.shape[1], gen) for p, g in zip(bases, mean)]
        for t in range(warm + 1):
            ups = [_subspace_step(method, st, p, g, n_probes, lr, gen)
                   for st, p, g in zip(states, bases, grads[t % len(grads)])]
        single += float(torch.sqrt(sum((u * u).sum() for u in ups))) / draws
        total = [a + u / draws for a, u in zip(total, ups)]
    expected = float(torch.sqrt(sum((u * u).sum() for u in total)))
    flat, ref = torch.cat([u.flatten() for u in total]), torch.cat([g.flatten() for g in mean])
    # with D draws of pure noise ‖mean‖/E‖single‖ is 1/√D: the floor this ratio is read against
    return {"single_norm": single, "mean_norm": expected, "snr": expected / single, "noise_only": draws ** -0.5,
            "cos_mean_update_grad": float(torch.nn.functional.cosine_similarity(flat, ref, dim=0))}  # > 0: descent


def subspace_capture(names: list[str], grads: list[list[torch.Tensor]], mean: list[torch.Tensor], windows: int,
                     interval: int, seed: int = 0) -> list[dict]:
    """(b) ‖Pᵀ G‖/‖G‖ of each target's ZO-MOPI basis at the start and after each anchored refresh of an ε → 0
    ZO-MOPI run (N=4) on the batch gradients, against √(r/m). G = the mean gradient (first-order LoRA's
    first step direction, up to Adam's scaling)."""
    method, gen = ZOMOPI(), torch.Generator().manual_seed(seed)
    bases = [haar_basis(g.shape[0], min(64, g.shape[0]), seed + i) for i, g in enumerate(mean)]
    states = [_fresh_state(method, p, g.shape[1], gen) for p, g in zip(bases, mean)]

    def capture(window: int) -> dict:
        ratios = [float((p.T @ g).norm() / g.norm()) for p, g in zip(bases, mean)]
        random = [(p.shape[1] / g.shape[0]) ** 0.5 for p, g in zip(bases, mean)]
        total = float(torch.sqrt(sum((p.T @ g).norm() ** 2 for p, g in zip(bases, mean)))
                      / torch.sqrt(sum(g.norm() ** 2 for g in mean)))
        return {"after_windows": window, "mean_ratio": sum(ratios) / len(ratios),
                "random_expectation": sum(random) / len(random), "all_targets_ratio": total,
                "min_ratio": min(ratios), "max_ratio": max(ratios)}

    out = [capture(0)]
    for w in range(1, windows + 1):
        for t in range(interval):
            for st, p, g in zip(states, bases, grads[t % len(grads)]):
                _subspace_step(method, st, p, g, 4, 1.0, gen)
        for i, (st, p) in enumerate(zip(states, bases)):  # the paper's refresh (ZOMOPI.refresh)
            new = anchored_basis(p, st["momentum"], method.k, seed + 7919 * w + i)
            st["momentum"] = reproject(new, p, st["momentum"])
            bases[i] = new
        out.append(capture(w))
    return out


def layer_shares(names: list[str], mean: list[torch.Tensor]) -> dict[int, float]:
    """(c) each decoder layer's share of ‖∇̄‖² (its targets together)."""
    layer, sq = re.compile(r"layers\.(\d+)\."), {}
    for n, g in zip(names, mean):
        i = int(layer.search(n).group(1))
        sq[i] = sq.get(i, 0.0) + float((g * g).sum())
    total = sum(sq.values())
    return {i: round(v / total, 4) for i, v in sorted(sq.items())}


def diagnose(args, names: list[str], grads: list[list[torch.Tensor]], mean: list[torch.Tensor]) -> dict:
    shares = layer_shares(names, mean)
    thirds = [sum(v for i, v in shares.items() if i * 3 // (max(shares) + 1) == j) for j in range(3)]
    print("(c) share of ‖∇̄‖² by layer:", shares)
    print(f"    lower / middle / upper third of the layers: {[round(x, 3) for x in thirds]}")
    keep = [i for i, n in enumerate(names) if int(re.search(r"layers\.(\d+)\.", n).group(1)) % args.layer_step == 0]
    names, mean = [names[i] for i in keep], [mean[i] for i in keep]
    grads = [[gs[i] for i in keep] for gs in grads]
    print(f"(a, b) on {len(names)} targets (every {args.layer_step}th layer)")
    floor, capture = {}, []
    for name, method in (("zo-mopi", ZOMOPI()), ("zo-muon", ZOMuon())) if "a" in args.parts else ():
        lr = DEFAULTS[name][1].lr
        for n_probes in args.probe_counts:
            r = noise_floor(method, lr, n_probes, grads, mean, args.warm, args.draws)
            floor[f"{name} N={n_probes}"] = {k: round(v, 4) for k, v in r.items()}
            print(f"(a) {name} lr {lr:g} N={n_probes}: single-step ‖ΔW‖ {r['single_norm']:.4f}, ‖mean of "
                  f"{args.draws}‖ {r['mean_norm']:.4f}, ratio {r['snr']:.3f} (pure noise {r['noise_only']:.3f}), "
                  f"cos(mean ΔW, −∇̄) {r['cos_mean_update_grad']:.3f}", flush=True)
    if "b" in args.parts:
        capture = subspace_capture(names, grads, mean, args.windows, args.interval)
    for c in capture:
        print(f"(b) after {c['after_windows']} refreshes: ‖PᵀG‖/‖G‖ mean {c['mean_ratio']:.3f} "
              f"(all targets {c['all_targets_ratio']:.3f}, range {c['min_ratio']:.3f}-{c['max_ratio']:.3f}), "
              f"random √(r/m) {c['random_expectation']:.3f}", flush=True)
    return {"layer_share": shares, "thirds": thirds, "noise_floor": floor, "subspace": capture}


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
    ap.add_argument("--diagnose", action="store_true", help="issue 15's measurements instead of the rule table")
    ap.add_argument("--draws", type=int, default=16, help="--diagnose: probe streams averaged for E ΔW")
    ap.add_argument("--warm", type=int, default=20, help="--diagnose: steps before the measured one")
    ap.add_argument("--probe-counts", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16],
                    help="--diagnose: N values")
    ap.add_argument("--parts", default="abc", help="--diagnose: which of (a), (b) to run ((c) always)")
    ap.add_argument("--windows", type=int, default=2, help="--diagnose: anchored refreshes for (b)")
    ap.add_argument("--interval", type=int, default=20, help="--diagnose: steps per window for (b)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.diagnose:  # gradients of every layer for (c); (a) and (b) on every --layer-step-th
        step, args.layer_step = args.layer_step, 1
        names, grads = gradients(args)
        args.layer_step = step
        mean = [torch.stack(gs).mean(0) for gs in zip(*grads)]
        print(json.dumps(diagnose(args, names, grads, mean)))
        return
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
