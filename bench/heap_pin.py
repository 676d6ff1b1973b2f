"""What pinning glibc's heap (`pin_heap`) buys and costs a fo-lora step on CPU: peak RSS, seconds, plan error.

    python bench/heap_pin.py                       # SmolLM2-135M shape, batch 8 x 64, with and without recompute
    python bench/heap_pin.py --batch 16 --steps 4

Each (recompute, pinned) case runs in a fresh spawned process (peak_rss_of_child): a random-init model of
SmolLM2-135M's shape, the fo-lora optimizer, one warm-up step, then --steps timed steps with edgezo's scored loss
on every position. Unpinned, glibc's dynamic mmap threshold leaves a backward's freed activations in the heap
(edgezo.plan.FO_HEAP_RETAINED); pinned, each of them is a fresh mapping whose pages fault in again.
Prints a row per case and one JSON line with the ratios measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import VOCAB as SHAPE_VOCAB  # noqa: E402
from edgezo.plan import Settings, plan  # noqa: E402
from edgezo.runtime.memory import peak_rss_of_child  # noqa: E402
from edgezo.runtime.synthetic import SHAPES  # noqa: E402

SMOL, VOCAB = SHAPES["smollm2-135m"], SHAPE_VOCAB["smollm2-135m"]


def runtime_floor(threads: int) -> None:
    """In a fresh process: the runtime alone (imports and a tiny model's step), what the plan's runtime item is."""
    run_case(dataclasses.asdict(Settings("fo-lora", batch_size=1, seq_len=8, loss="scored")), 1, threads,
             SHAPES["tiny"], SHAPE_VOCAB["tiny"])


def run_case(settings: dict, steps: int, threads: int, shape: dict = SMOL, vocab: int = VOCAB
             ) -> tuple[str, list[float]]:
    """In a fresh process: (config JSON, seconds of each timed fo-lora step)."""
    import torch

    from edgezo.data import make_loss
    from edgezo.delta import DeltaModel
    from edgezo.optim import make_optimizer
    from edgezo.runtime.memory import pin_heap_threshold
    from edgezo.runtime.synthetic import make_model

    s = Settings(**settings)
    if s.pin_heap:
        pin_heap_threshold()
    if threads:
        torch.set_num_threads(threads)
    model = make_model("llama", vocab_size=vocab, **shape)
    opt = make_optimizer(s.optimizer, DeltaModel.attach(model), **s.optimizer_kwargs())
    ids = torch.randint(0, vocab, (s.batch_size, s.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "target_mask": torch.ones_like(ids, dtype=torch.bool)}
    loss = make_loss(SimpleNamespace(task="complete"))
    opt.step(loss, batch)  # warm-up: Adam's moments, the kernels, the heap's first growth
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step(loss, batch)
        seconds.append(time.perf_counter() - start)
    return model.config.to_json_string(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    import platform

    import torch
    from transformers import LlamaConfig

    _, floor = peak_rss_of_child(runtime_floor, args.threads)
    rows, summary = [], {"runtime_floor_mib": round(floor / 2**20)}
    print(f"fo-lora, SmolLM2-135M shape, batch {args.batch} x {args.seq}, {args.steps} timed steps per case; "
          f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{' '.join(platform.libc_ver())}; runtime floor {floor / 2**20:.0f} MiB (the plan's runtime item)")
    print(f"{'recompute':>9} {'heap':>8} {'plan MiB':>9} {'peak MiB':>9} {'peak/plan':>9} {'s/step':>7}")
    for recompute in (True, False):
        case = {}
        for pinned in (False, True):
            s = Settings("fo-lora", batch_size=args.batch, seq_len=args.seq, loss="scored", recompute=recompute,
                         pin_heap=pinned)
            (config, seconds), peak = peak_rss_of_child(run_case, dataclasses.asdict(s), args.steps, args.threads)
            planned = plan(LlamaConfig.from_dict(json.loads(config)), s, runtime_bytes=floor).peak_bytes
            case[pinned] = (peak, statistics.median(seconds))
            print(f"{recompute!s:>9} {'pinned' if pinned else 'glibc':>8} {planned / 2**20:9.0f} {peak / 2**20:9.0f} "
                  f"{peak / planned:9.3f} {case[pinned][1]:7.2f}", flush=True)
            rows.append({"recompute": recompute, "pinned": pinned, "plan_mib": round(planned / 2**20),
                         "peak_mib": round(peak / 2**20), "s_per_step": round(case[pinned][1], 3)})
        key = "recompute" if recompute else "no_recompute"
        summary[key] = {"pinned_peak_ratio": round(case[True][0] / case[False][0], 3),
                        "pinned_time_ratio": round(case[True][1] / case[False][1], 3)}
    print(json.dumps({"batch": args.batch, "seq": args.seq, "rows": rows, **summary}))


if __name__ == "__main__":
    main()
