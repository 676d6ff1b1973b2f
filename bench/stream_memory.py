"""Peak memory of layer streaming vs the resident model, relative to the weight bytes.

    python bench/stream_memory.py [--layers 24 --hidden 1024 --intermediate 2816 --batch 1 --seq 32]

Writes a random-init Llama of that shape (fp32 safetensors) to a temp folder, then runs each phase
in a fresh process. Each phase resets the kernel's RSS high-water mark (/proc/self/clear_refs) once
its imports are done and reports how far VmHWM rose above that point: the exact peak RSS
(anonymous memory plus touched file-backed pages) of load + work. ru_maxrss is not used because a
spawned child's ru_maxrss starts at its parent's RSS.

Phases: `baseline` (config, meta skeleton, tokenizer: the runtime without weights), the resident
model (`load_model`) and the streamed one (`load_streaming`, with and without prefetch), each for
one forward of the batch and for one zo-mopi step (4 two-sided probes = 8 slices fused in one
forward). ratio = (peak - baseline) / weight bytes. Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from edgezo.runtime.load import load_model
from edgezo.runtime.memory import peak_rss_of_child
from edgezo.runtime.stream import SafetensorsReader, load_streaming

MB = 1 << 20


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _phase(folder: str, phase: str, batch: int, seq: int) -> dict:
    """Run one phase in this (fresh) process; the rise of VmHWM over the RSS at its start."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    start, t0, stats = _vm("VmRSS"), time.perf_counter(), None
    if phase == "baseline":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        AutoTokenizer.from_pretrained(folder)
    else:
        kind, work = phase.split(" ", 1)
        loaded = load_model(folder) if kind == "resident" else load_streaming(folder, prefetch=kind == "streamed")
        ids = torch.randint(0, len(loaded.tokenizer), (batch, seq), generator=torch.Generator().manual_seed(0))
        if work == "forward":
            with torch.inference_mode():
                loaded.model(input_ids=ids)
        else:
            _zo_step(loaded.model, ids)
        if kind != "resident":
            stats = vars(loaded.streamer.stats)
    return {"peak": _vm("VmHWM") - start, "seconds": time.perf_counter() - t0, "stats": stats}


def _zo_step(model, ids) -> None:
    import torch.nn.functional as F

    from edgezo.delta import DeltaModel
    from edgezo.optim import make_optimizer

    def loss(m, batch, slices):
        logits = m(input_ids=batch["input_ids"]).logits.float()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
        return ce.view(slices, -1).mean(1)

    make_optimizer("zo-mopi", DeltaModel.attach(model), rank=8, k=4).step(loss, {"input_ids": ids})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--folder", help="reuse (or create) the model here instead of a temp folder")
    args = ap.parse_args()

    from edgezo.runtime.synthetic import save_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or Path(tmp) / "model")
        if not (folder / "config.json").exists():
            save_model_dir(folder, "llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads)
        entries = SafetensorsReader(folder).entries
        weights = sum(e.end - e.start for e in entries.values())
        blocks = sum(e.end - e.start for name, e in entries.items() if ".layers." in name)
        kinds = ("resident", "streamed", "streamed-noprefetch")
        phases = ["baseline"] + [f"{k} {w}" for w in ("forward", "zo-step") for k in kinds]
        rows = {p: peak_rss_of_child(_phase, str(folder), p, args.batch, args.seq)[0] for p in phases}

    base = rows["baseline"]["peak"]
    ratio = {p: (r["peak"] - base) / weights for p, r in rows.items()}
    print(f"weights {weights / MB:.1f} MB ({args.layers} blocks of {blocks / args.layers / MB:.1f} MB, "
          f"resident {(weights - blocks) / MB:.1f} MB), batch {args.batch}x{args.seq}, fp32, CPU")
    print(f"{'phase':<32}{'peak MB':>10}{'- baseline':>12}{'/ weights':>11}{'seconds':>9}")
    for p, r in rows.items():
        print(f"{p:<32}{r['peak'] / MB:>10.1f}{(r['peak'] - base) / MB:>12.1f}{ratio[p]:>11.3f}{r['seconds']:>9.1f}")
    print(json.dumps({
        "weights_bytes": weights, "block_bytes": blocks // args.layers, "baseline_bytes": base,
        "streamed_peak_bytes": rows["streamed forward"]["peak"],
        "resident_peak_bytes": rows["resident forward"]["peak"],
        "ratio": round(ratio["streamed forward"], 4), "resident_ratio": round(ratio["resident forward"], 4),
        "noprefetch_ratio": round(ratio["streamed-noprefetch forward"], 4),
        "zo_step_ratio": round(ratio["streamed zo-step"], 4),
        "resident_zo_step_ratio": round(ratio["resident zo-step"], 4),
        "prefetch_hits": rows["streamed forward"]["stats"]["prefetch_hits"],
        "measure": "VmHWM rise in a fresh process after imports; ratio = (peak - baseline) / weight bytes",
    }))


if __name__ == "__main__":
    main()
