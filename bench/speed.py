"""Time of one ZO-MOPI step (fused and separate probes) against one inference forward.

    python bench/speed.py                                   # CPU: llama-350m shape, fp32, 1x16 and 1x128
    python bench/speed.py --layers 4 --seq 32               # quick check
    python bench/speed.py --device cuda --shape opt-6.7b --dtype fp16 --batch 1 --seq 128
    python bench/speed.py --device cuda --shape opt-6.7b --dtype fp16 --batch 32 --seq 128
    python bench/speed.py --device cuda --shape opt-1.3b --precision bnb-nf4 --batch 1,32

For each batch x sequence, in interleaved rounds (so drift and neighbours' load hit every variant alike):
  forward   the plain `model(input_ids=ids).logits` a user runs (delta hooks removed)
  fused     one ZO-MOPI step (r=64, k=32, N=8, one-sided: N+1 = 9 slices), all 9 slices in ONE forward
            of the batch repeated slice-major (config.fuse=None, the default)
  separate  the same step with one forward per slice (fuse=1)
with edgezo's real loss (data.make_loss of an lm TaskData). After --warmup rounds, the median of
--repeats rounds. Reported: seconds, step / ((N+1) x forward), and tokens per second (batch x seq per
forward for inference, per step for tuning).
Targets: CPU (batch <= 4): fused <= 0.6 x (N+1) x forward. CUDA: batch 1: fused <= 3 x forward;
batch >= 32: fused <= 1.1 x (N+1) x forward.

Prints a table; the last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common as C  # noqa: E402

FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _target(device: str, batch: int, n_slices: int, forward: float, fused: float) -> tuple[str, float, bool] | None:
    """(description, limit in seconds, met) of the target that applies, if any."""
    if device == "cpu" and batch <= 4:
        limit = 0.6 * n_slices * forward
        return f"fused <= 0.6 x {n_slices} x forward", limit, fused <= limit
    if device == "cuda" and batch == 1:
        return "fused <= 3 x forward", 3 * forward, fused <= 3 * forward
    if device == "cuda" and batch >= 32:
        limit = 1.1 * n_slices * forward
        return f"fused <= 1.1 x {n_slices} x forward", limit, fused <= limit
    return None


def _load(args, precision: str):
    if precision in FLOATS:
        return C.build_model(args.shape, args.vocab, args.layers, FLOATS[precision], args.device)
    from edgezo.runtime.load import load_model

    folder = C.synthetic_folder(args.shape, args.vocab, args.layers, "fp16" if args.device == "cuda" else "fp32",
                                args.device)
    return load_model(folder, precision=precision, device=args.device).model


def _measure(args, model, precision: str, batch: int, seq: int, log) -> dict:
    dev = args.device
    ids, tune, loss = C.lm_batch(args.vocab, batch, seq, device=dev)
    opt = C.make_opt(model, "zo-mopi", None, n_probes=args.n_probes, state_dtype=args.state_dtype)
    n_slices = args.n_probes + 1

    def forward():
        with C.plain(opt.delta), torch.inference_mode():
            model(input_ids=ids).logits

    stacked_ids = ids.repeat(n_slices, 1)

    def stacked():  # the fused step's rows through the bare model: its floor without delta path and probes
        with C.plain(opt.delta), torch.inference_mode():
            model(input_ids=stacked_ids, use_cache=False).logits

    graphed = None
    if args.cuda_graph:  # the same optimizer, its update replayed as a CUDA graph in the "graphed" rounds
        from edgezo.optim.graphed import GraphedUpdate

        graphed = GraphedUpdate(opt)
    offloaded = None
    if args.offload_state:  # a second optimizer, state in host memory; its hooks are attached only for its step
        offloaded = C.make_opt(model, "zo-mopi", None, n_probes=args.n_probes, state_dtype=args.state_dtype,
                               offload_state=True)
        offloaded.delta.detach()

    @contextlib.contextmanager
    def offloaded_hooks():  # the offloaded optimizer's hooks in place of the resident one's
        with C.plain(opt.delta), C.attached(offloaded.delta):
            yield

    def offloaded_step():
        with offloaded_hooks():
            offloaded.step(loss, tune)

    def step(fuse, graph=False):
        def run():
            opt.config.fuse, opt.graphed = fuse, graphed if graph else None
            opt.step(loss, tune)

        return run

    variants = {"forward": forward, "fused": step(None), "separate": step(1)}
    if args.stacked:
        variants["stacked"] = stacked
    if graphed is not None:
        variants["graphed"] = step(None, graph=True)
    if offloaded is not None:
        variants["offloaded"] = offloaded_step
    times = {k: [] for k in variants}
    for r in range(args.warmup + args.repeats):
        last = {name: C.timed(fn, dev) for name, fn in variants.items()}
        if r >= args.warmup:
            for name, t in last.items():
                times[name].append(t)
        log(f"  {precision} {batch}x{seq} round {r + 1}/{args.warmup + args.repeats}"
            f"{' (warm-up)' if r < args.warmup else ''}: " + ", ".join(f"{k} {t:.3f}s" for k, t in last.items()))
    if graphed is not None:
        log(f"  fused step with the update replayed as a CUDA graph: {C.median(times['graphed']):.4f}s = "
            f"{C.median(times['graphed']) / C.median(times['forward']):.2f} x forward")
    if offloaded is not None:
        log(f"  fused step with the state in host memory (offload_state): {C.median(times['offloaded']):.4f}s = "
            f"{C.median(times['offloaded']) / C.median(times['forward']):.2f} x forward, "
            f"{C.median(times['offloaded']) / (n_slices * C.median(times['forward'])):.3f} x {n_slices} forwards")
    if args.profile:
        opt.config.fuse, opt.graphed = None, None
        _profile(opt, loss, tune, dev, log, args.trace and f"{args.trace}/resident_b{batch}.json")
        if offloaded is not None:
            log("  the same, state in host memory (offload_state):")
            with offloaded_hooks():
                _profile(offloaded, loss, tune, dev, log, args.trace and f"{args.trace}/offloaded_b{batch}.json")
    opt.delta.detach()
    med = {k: C.median(v) for k, v in times.items()}
    tokens, nine_fwd = batch * seq, n_slices * med["forward"]
    row = dict(precision=precision, batch=batch, seq=seq, slices=n_slices, forward_s=med["forward"],
               fused_s=med["fused"], separate_s=med["separate"], stacked_s=med.get("stacked"),
               fused_ratio=med["fused"] / nine_fwd, separate_ratio=med["separate"] / nine_fwd,
               stacked_ratio=med["stacked"] / nine_fwd if "stacked" in med else None,
               fused_over_forward=med["fused"] / med["forward"], fusion_speedup=med["separate"] / med["fused"],
               inference_tokens_per_s=tokens / med["forward"], fused_tokens_per_s=tokens / med["fused"],
               separate_tokens_per_s=tokens / med["separate"],
               graphed_s=med.get("graphed"),
               graphed_over_forward=med["graphed"] / med["forward"] if "graphed" in med else None,
               offloaded_s=med.get("offloaded"),
               offloaded_ratio=med["offloaded"] / nine_fwd if "offloaded" in med else None,
               samples={k: [round(x, 4) for x in v] for k, v in times.items()})
    tgt = _target(dev, batch, n_slices, med["forward"], med["fused"])
    if tgt:
        row.update(target=tgt[0], target_met=tgt[2])
    return row


def _profile(opt, loss, tune, device: str, log, trace: str | None = None) -> None:
    """Where one fused step's time goes: its forward and update parts (synced medians of 5; on CPU also the
    update without its draw threads), then the ops with the most self time, and how many ops run;
    `trace`: also a Chrome trace of that step there."""
    from torch.profiler import ProfilerActivity, profile

    from edgezo.zo import estimators

    cfg, plan = opt.config, estimators.slices(opt.config.n_probes, opt.config.two_sided)
    g = torch.randn(cfg.n_probes)
    t = opt.state.step
    forward = C.median([C.timed(lambda: opt.evaluate(loss, tune, plan, t), device) for _ in range(5)])
    update = C.median([C.timed(lambda: opt.apply_update(g, t), device) for _ in range(5)])
    log(f"  fused step parts: forward of all slices {forward:.4f}s, update {update:.4f}s")
    if device == "cpu":  # the update draws a target's probes on several threads (edgezo.zo.probes.gaussian_rows)
        from edgezo.optim import base

        threaded, base.draw_workers = base.draw_workers, lambda device: 0
        try:
            inline = C.median([C.timed(lambda: opt.apply_update(g, t), device) for _ in range(5)])
        finally:
            base.draw_workers = threaded
        log(f"  update with every probe drawn in the calling thread: {inline:.4f}s")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        opt.step(loss, tune)
        C.sync(device)
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    log(f"  profile: {sum(e.count for e in events)} op calls in one fused step")
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    log(events.table(sort_by=key, row_limit=20))


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-350m", help="synthetic shape (edgezo.runtime.synthetic.SHAPES)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default: the real model's)")
    ap.add_argument("--layers", type=int, help="fewer decoder layers, for quick checks")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", "--dtype", dest="precision", help="fp32/fp16/bf16 or a quantized precision "
                    "(loaded through load_model), comma-separated; default fp32 on cpu, fp16 on cuda")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--seq", default=None, help="comma-separated sequence lengths (default cpu: 16,128; cuda: 128)")
    ap.add_argument("--n-probes", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 cpu, 2 cuda)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3 cpu, 5 cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--profile", action="store_true", help="print the op profile of one fused step")
    ap.add_argument("--cuda-graph", action="store_true", help="also time the fused step with its update replayed "
                    "as a CUDA graph (ZOConfig.cuda_graph)")
    ap.add_argument("--trace", help="with --profile: write Chrome traces of the profiled steps into this folder")
    ap.add_argument("--state-dtype", default="fp32", help="how ZO-MOPI stores P, M and V (fp32, bf16, fp16)")
    ap.add_argument("--offload-state", action="store_true", help="also time the fused step with its state in "
                    "host memory (ZOConfig.offload_state), in the same rounds")
    ap.add_argument("--no-stacked", dest="stacked", action="store_false",
                    help="skip timing the bare model on the (N+1)x stacked batch (the fused step's floor)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.vocab = args.vocab or C.VOCAB.get(args.shape)
    args.precision = args.precision or ("fp16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 3)
    batches = [int(b) for b in args.batch.split(",")]
    seqs = [int(s) for s in (args.seq or ("128" if cuda else "16,128")).split(",")]
    if not cuda:
        C.set_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0, rows = time.perf_counter(), []
    params = C.param_count(args.shape, args.vocab, args.layers)
    for precision in args.precision.split(","):
        model = _load(args, precision)
        log(f"{precision} model ready ({time.perf_counter() - t0:.0f} s)")
        rows += [_measure(args, model, precision, b, s, log) for b in batches for s in seqs]
        del model
        C.settle()
        if cuda:
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
    print(f"\n{args.shape} (random init, {params / 1e6:.0f}M params, vocab {args.vocab}"
          f"{f', {args.layers} layers' if args.layers else ''}), {where}; "
          f"ZO-MOPI r=64 k=32 N={args.n_probes}, {args.state_dtype} state; median of {args.repeats} after {args.warmup} warm-up")
    hdr = (f"{'precision':<12}{'batch x seq':<12}{'forward s':>10}{'fused s':>10}{'separate s':>11}{'fused/(N+1)fwd':>15}"
           f"{'sep/(N+1)fwd':>13}{'stack/(N+1)fwd':>15}{'fused/fwd':>10}{'infer tok/s':>12}{'fused tok/s':>12}{'sep tok/s':>10}  target")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tgt = f"{r['target']}: {'MET' if r['target_met'] else 'MISSED'}" if "target" in r else "-"
        shape = f"{r['batch']}x{r['seq']}"
        print(f"{r['precision']:<12}{shape:<12}{r['forward_s']:>10.3f}{r['fused_s']:>10.3f}{r['separate_s']:>11.3f}"
              f"{r['fused_ratio']:>15.3f}{r['separate_ratio']:>13.3f}{_fmt(r['stacked_ratio']):>15}"
              f"{r['fused_over_forward']:>10.2f}"
              f"{r['inference_tokens_per_s']:>12.1f}{r['fused_tokens_per_s']:>12.1f}"
              f"{r['separate_tokens_per_s']:>10.1f}  {tgt}")
    final = dict(bench="speed", device=args.device, where=where, shape=args.shape, layers=args.layers,
                 state_dtype=args.state_dtype,
                 params=params, precision=args.precision, n_probes=args.n_probes, repeats=args.repeats,
                 seconds=round(time.perf_counter() - t0, 1),
                 rows=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    final["targets_met"] = {f"{r['precision']} {r['batch']}x{r['seq']}": r["target_met"] for r in rows if "target" in r}
    C.emit(final)
    return final


if __name__ == "__main__":
    main()
