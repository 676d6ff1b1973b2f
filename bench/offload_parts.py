"""Where the state in host memory (offload_state) costs time: the fused step's two parts, resident and
offloaded, and the offloaded forward with its copies taken out (its hooks' bookkeeping alone).

    python bench/offload_parts.py                  # CUDA only; OPT-6.7B shape, fp16, batch 1 x 128, fp16 state

Prints one line per measurement (median of --repeats interleaved rounds, synced) and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from edgezo import offload  # noqa: E402
from edgezo.zo import estimators  # noqa: E402


class CopiedOnce(offload.Shuttle):
    """Serves each key's first device copies ever after: the forward's hooks without their copies."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.cache: dict = {}

    def fetch(self, key, owners, host, keep=False):
        if key not in self.cache:
            offload.Shuttle.fetch_ahead(self, key, owners, host)
            self.cache[key] = super().fetch(key, owners, host)
        return self.cache[key]

    def fetch_ahead(self, key, owners, host):
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="opt-6.7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--state-dtype", default="fp16")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/offload_parts.py measures offload_state, which moves state off a GPU: run it on CUDA")
    model = C.build_model(args.shape, None, None, torch.float16, "cuda")
    vocab = model.get_output_embeddings().out_features
    _, batch, loss = C.lm_batch(vocab, args.batch, args.seq, device="cuda")
    plan = estimators.slices(8, False)
    opts = {name: C.make_opt(model, "zo-mopi", None, n_probes=8, state_dtype=args.state_dtype, offload_state=off)
            for name, off in (("resident", False), ("offloaded", True))}
    for opt in opts.values():
        opt.delta.detach()

    def forward(opt):
        with C.attached(opt.delta):
            opt.evaluate(loss, batch, plan, 0)

    g, offloaded = torch.randn(8), opts["offloaded"]
    real, copied_once = offloaded.delta.shuttle, CopiedOnce(torch.device("cuda"))

    def without_copies():
        offloaded.delta.shuttle = copied_once
        try:
            forward(offloaded)
        finally:
            offloaded.delta.shuttle = real

    variants = {"resident_forward_s": lambda: forward(opts["resident"]),
                "resident_update_s": lambda: opts["resident"].apply_update(g, 0),
                "offloaded_forward_s": lambda: forward(offloaded),
                "offloaded_update_s": lambda: offloaded.apply_update(g, 0),
                "offloaded_forward_without_copies_s": without_copies}
    times = {name: [] for name in variants}
    for r in range(3 + args.repeats):  # interleaved rounds: the card's clock drifts alike for all
        for name, fn in variants.items():
            t = C.timed(fn, "cuda")
            if r >= 3:
                times[name].append(t)
    out = {name: C.median(ts) for name, ts in times.items()}
    for key, value in out.items():
        print(f"{key}: {value * 1e3:.1f} ms")
    result = {"bench": "offload_parts", "gpu": torch.cuda.get_device_name(), "shape": args.shape,
              "batch": args.batch, "seq": args.seq, "state_dtype": args.state_dtype,
              **{k: round(v, 5) for k, v in out.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
