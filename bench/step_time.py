"""Seconds per step and per forward of each method with its defaults, on the real model and a real batch.

    python bench/step_time.py --data DIR [--dataset news] [--device cuda] [--threads 2] [--results RUN.json]

SmolLM2-135M-Instruct (fp32) on one batch of a convergence benchmark task (16 examples, one row per label,
`edgezo tune --task classify`'s loss), one process, the methods measured in turn on the same batch. With the
forwards each method needed to reach the target accuracy (--results: bench/convergence.py's .json on the same
task) this gives the wall time to it, in one run: time = forwards / (forwards per step) x (seconds per step).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.convergence import DATASETS  # noqa: E402
from edgezo import data as D  # noqa: E402
from edgezo.delta import DeltaModel  # noqa: E402
from edgezo.optim import make_optimizer  # noqa: E402
from edgezo.runtime.load import find_demo_gguf, load_model  # noqa: E402

METHODS = ("zo-mopi", "zo-muon", "mezo", "fo-lora")  # each with its defaults (edgezo.optim.DEFAULTS, FOConfig)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="GGUF file or HF folder (default: the demo SmolLM2 GGUF)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", required=True, help="folder with the convergence benchmark's train/test.jsonl")
    p.add_argument("--dataset", choices=list(DATASETS), default="sentiment", help="the task's prompt and label words")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method, after one warm-up step")
    p.add_argument("--results", help="bench/convergence.py's .json on this task: adds the time to its target")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)} (all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model or find_demo_gguf(), "fp32", args.device)
    folder = Path(args.data)
    _, template, label_words, _ = DATASETS[args.dataset]  # the convergence benchmark's prompt for the task
    task = D.load_task_data(folder / "train.jsonl", loaded.tokenizer, "classify", eval_path=folder / "test.jsonl",
                            template=template, label_words=label_words, max_length=128)
    batch = {k: v.to(loaded.device) for k, v in D.batch_at(task, 16, 0, 0).items()}
    loss = D.make_loss(task)
    rows = {}
    with torch.no_grad():
        for _ in range(2):
            sync(loaded.device)
            t = time.perf_counter()
            loss(loaded.model, batch, 1)
            sync(loaded.device)
        rows["inference forward"] = {"s_per_step": time.perf_counter() - t, "forwards_per_step": 1}
    for method in args.methods.split(","):
        delta = DeltaModel.attach(loaded.model)
        opt = make_optimizer(method, delta, seed=0)
        times, forwards = [], 0
        for i in range(args.steps + 1):
            sync(loaded.device)
            t = time.perf_counter()
            forwards = opt.step(loss, batch).forwards
            sync(loaded.device)
            times.append(time.perf_counter() - t)
        delta.detach()
        rows[method] = {"s_per_step": statistics.median(times[1:]), "forwards_per_step": forwards}
    base = rows["inference forward"]["s_per_step"]
    print(f"{'method':<18} {'s/step':>8} {'fwd/step':>8} {'s/forward':>10} {'x inference':>12}")
    for name, r in rows.items():
        r["s_per_forward"] = r["s_per_step"] / r["forwards_per_step"]
        r["x_inference_per_forward"] = r["s_per_forward"] / base
        print(f"{name:<18} {r['s_per_step']:8.3f} {r['forwards_per_step']:8d} {r['s_per_forward']:10.3f} "
              f"{r['x_inference_per_forward']:12.2f}")
    out = {"device": args.device, "threads": args.threads, "dataset": args.dataset, "rows": rows}
    if args.results:
        out["to_target"] = time_to_target(rows, json.loads(Path(args.results).read_text()))
    print(json.dumps(out))


def time_to_target(rows: dict, results: dict) -> dict:
    """Seconds each method takes to half and to 90% of first-order's gain, from its forwards to that accuracy
    (median curve, --results) and this run's seconds per forward, and each as a multiple of the fastest."""
    head, out = results["headline"], {}
    for level, acc_key, forwards_key in (("90% of the gain", "target", "forwards_to_target"),
                                         ("half the gain", "half_gain", "forwards_to_half_gain")):
        reached = {m: f for m, f in head[forwards_key].items() if f is not None and m in rows}
        seconds = {m: round(f * rows[m]["s_per_forward"], 2) for m, f in reached.items()}
        best = min(seconds.values(), default=None)
        print(f"to {100 * head[acc_key]:.1f}% ({level}; forwards from the --results run):")
        for m in [m for m in rows if m != "inference forward"]:
            if m in seconds:
                print(f"  {m:<16} {reached[m]:>6} forwards  {seconds[m]:9.1f} s  x{seconds[m] / best:.1f}")
            else:
                print(f"  {m:<16} not reached in {results['config']['forwards']} forwards, or not run")
        out[acc_key] = {"accuracy": head[acc_key], "forwards": reached, "seconds": seconds,
                        "x_fastest": {m: round(v / best, 2) for m, v in seconds.items()}}
    return out


if __name__ == "__main__":
    main()
