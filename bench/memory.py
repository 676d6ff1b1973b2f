"""Peak memory of one tune step vs one inference forward, per precision and optimizer (and with streaming).

    python bench/memory.py                                  # CPU: llama-350m shape (vocab 32000), 8x128
    python bench/memory.py --layers 4 --precision fp32      # quick check
    python bench/memory.py --model both                     # also the real SmolLM2-135M (GGUF)
    python bench/memory.py --device cuda --shape opt-6.7b --dtype fp16 --batch 1 --seq 128
    python bench/memory.py --device cuda --shape opt-6.7b --precision bnb-nf4

What is compared, at the same batch x sequence:
  inference  the plain forward a user runs: `model(input_ids=ids).logits` (transformers defaults, so
             use_cache=True and its KV cache); "inference (no cache)" passes use_cache=False.
  tune       DeltaModel.attach + make_optimizer (state allocated) + one `opt.step` with edgezo's real
             loss (data.make_loss of an lm TaskData: LM head only at scored positions, chunked).
             ZO-MOPI r=64 k=32 N=8, ZO-Muon r=64 N=8 (one-sided: 9 slices), LOZO and MeZO at their
             defaults (one two-sided probe: 2 slices). `--fuse` slices share one forward (1 = separate
             forwards, "all" = the whole step in one forward with the batch repeated slice-major).
  streaming  load_streaming (fp32 blocks read from disk at each forward): (peak - runtime) / weights.

CPU: every phase runs in a fresh spawned process (edgezo.runtime.memory.peak_rss_of_child). The model is
loaded first (random-init weights saved once as fp32 safetensors, loaded through load_model at each
precision), the heap is trimmed, the kernel's RSS high-water mark is reset (/proc/self/clear_refs), and
the phase's peak is VmHWM afterwards: weights + runtime + what the phase adds (the load's own transient
peak is reported apart). glibc's mmap threshold is pinned (edgezo.runtime.memory.pin_heap_threshold) in every
phase alike, so RSS follows live tensors. CUDA: one process, torch.cuda.max_memory_allocated via
PeakMemory, reset between phases.

Prints a table; the last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import common as C  # noqa: E402

TARGET = 1.05  # dense ZO-MOPI tune-step peak / inference-forward peak
DENSE = ("fp32", "fp16", "bf16")


# ---------------------------------------------------------------- one phase (runs in a child on CPU)


def _load(spec: dict):
    from edgezo.runtime.load import find_demo_gguf, load_model

    source = spec["source"]
    path = str(find_demo_gguf()) if source == "smollm2" else source
    if spec.get("streaming"):
        from edgezo.runtime.stream import load_streaming

        return load_streaming(path, precision=spec["precision"], device=spec["device"])
    return load_model(path, precision=spec["precision"], device=spec["device"])


def _work(spec: dict, model, vocab: int) -> dict:
    """Run the phase's work on a loaded model; returns figures other than the peak."""
    ids, batch, loss = C.lm_batch(vocab, spec["batch"], spec["seq"], device=spec["device"])
    if spec.get("loss") == "minimal":
        loss = C.minimal_lm_loss(spec.get("logit_elements") or 1 << 23)
    out = {}
    if spec["kind"] == "inference":
        with torch.inference_mode():
            logits = model(input_ids=ids, **({"use_cache": False} if spec.get("nocache") else {})).logits
        out["logits_bytes"] = logits.numel() * logits.element_size()
        del logits
    else:
        opt = C.make_opt(model, spec["optimizer"], spec["fuse"], **spec.get("settings", {}))
        out["state_bytes"] = C.state_bytes(opt)
        res = opt.step(loss, batch)
        out["loss"], out["forwards"] = res.loss, res.forwards
        out["slices_per_forward"] = min(spec["fuse"] or res.forwards, res.forwards)
        out["_delta"] = opt.delta  # the caller detaches it (CUDA phases share one model)
    return out


def _phase(spec: dict) -> dict:
    """CPU: one phase in this (fresh) process. peak = VmHWM after resetting it once the model is loaded."""
    C.set_threads(spec["threads"])
    if spec["pin"]:
        from edgezo.runtime.memory import pin_heap_threshold

        pin_heap_threshold()
    if spec["kind"] == "runtime":  # imports, tokenizer, meta skeleton: the runtime without weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from edgezo.runtime.load import find_demo_gguf, resolve_folder

        folder = resolve_folder(find_demo_gguf()) if spec["source"] == "smollm2" else spec["source"]
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        AutoTokenizer.from_pretrained(folder)
        C.settle()
        return {"peak": C.vm("VmHWM"), "start": C.vm("VmRSS"), "seconds": 0.0}
    import edgezo.data  # (imports done before the load, like the runtime phase)
    import edgezo.optim  # noqa: F401

    if spec.get("logit_elements"):  # diagnostic: the scored loss's LM-head chunk (fp32 logits per call)
        edgezo.data._LOGIT_ELEMENTS = spec["logit_elements"]

    t0 = time.perf_counter()
    loaded = _load(spec)
    load_peak = C.vm("VmHWM")
    model = loaded.model
    vocab = model.get_output_embeddings().out_features
    if spec.get("streaming"):  # blocks live on disk: count the full checkpoint
        from edgezo.runtime.stream import SafetensorsReader

        weights = sum(e.end - e.start for e in SafetensorsReader(loaded.folder).entries.values())
        C.touch_weights(model)  # the resident part (embeddings, norm, head)
    else:
        weights = C.weight_bytes(model)
        C.touch_weights(model)
    C.settle()
    start = C.reset_hwm()
    t1 = time.perf_counter()
    out = _work(spec, model, vocab)
    peak = C.vm("VmHWM")
    out.pop("_delta", None)
    out.update(peak=peak, start=start, load_peak=load_peak, seconds=time.perf_counter() - t1,
               load_seconds=t1 - t0, weight_bytes=weights, params=sum(p.numel() for p in model.parameters()))
    if spec.get("streaming"):
        out["stream"] = vars(loaded.streamer.stats)
    return out


# ---------------------------------------------------------------- CUDA (or --inprocess): one process, PeakMemory


class _InProcessRunner:
    """All phases of one precision on one model in this process (CUDA: allocator peak, reset per phase)."""

    def __init__(self, args, precision: str):
        self.args, self.precision = args, precision
        self.model = None
        self.cuda = args.device == "cuda"

    def load(self):
        from edgezo.runtime.load import load_model

        a = self.args
        if self.precision in ("fp16", "bf16", "fp32"):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]
            self.model = C.build_model(a.shape, a.vocab, a.layers, dtype, a.device)
        else:  # quantized: save the random model once, then load it as a user would
            folder = C.synthetic_folder(a.shape, a.vocab, a.layers, "fp16" if self.cuda else "fp32", a.device)
            self._free()
            self.model = load_model(folder, precision=self.precision, device=a.device).model
        return self.model

    def _free(self):
        C.settle()
        if self.cuda:
            torch.cuda.empty_cache()

    def phase(self, spec: dict) -> dict:
        from edgezo.runtime.memory import PeakMemory

        model = self.model
        vocab = model.get_output_embeddings().out_features
        self._free()
        t0 = time.perf_counter()
        with PeakMemory(self.args.device) as pm:
            out = _work(spec, model, vocab)
        out.update(peak=pm.peak_bytes, start=pm.baseline_bytes, load_peak=0, seconds=time.perf_counter() - t0,
                   load_seconds=0.0, weight_bytes=C.weight_bytes(model),
                   params=sum(p.numel() for p in model.parameters()))
        delta = out.pop("_delta", None)
        if delta is not None:  # the next phase starts from the bare model
            delta.detach()
        return out


# ---------------------------------------------------------------- driver


def _phases(args, precision: str, batch: int) -> list[dict]:
    base = dict(precision=precision, batch=batch, seq=args.seq, device=args.device, threads=args.threads,
                pin=not args.no_pin, logit_elements=args.logit_elements, loss=args.loss)
    out = [dict(base, kind="inference", label="inference")]
    if not args.no_nocache:
        out.append(dict(base, kind="inference", nocache=True, label="inference (no cache)"))
    for name in args.optimizers:
        out.append(dict(base, kind="tune", optimizer=name, fuse=args.fuse, label=f"tune {name}"))
    for dtype in args.state_dtypes:
        out.append(dict(base, kind="tune", optimizer="zo-mopi", fuse=args.fuse, settings=dict(state_dtype=dtype),
                        label=f"tune zo-mopi ({dtype} state)"))
    if args.offload_state:
        for dtype in ["fp32", *args.state_dtypes]:
            out.append(dict(base, kind="tune", optimizer="zo-mopi", fuse=args.fuse,
                            settings=dict(state_dtype=dtype, offload_state=True),
                            label=f"tune zo-mopi ({dtype} host state)"))
    if args.fused_row and precision == args.precisions[0] and "zo-mopi" in args.optimizers and args.fuse is not None:
        out.append(dict(base, kind="tune", optimizer="zo-mopi", fuse=None, label="tune zo-mopi (fuse=all)"))
    return out


def _run_cpu(args, source: str, log) -> tuple[dict, list]:
    from edgezo.runtime.memory import peak_rss_of_child

    rows = []
    common = dict(source=source, device="cpu", threads=args.threads, pin=not args.no_pin)
    runtime = peak_rss_of_child(_phase, dict(common, kind="runtime", label="runtime"))[0]
    log(f"runtime (imports, tokenizer, meta skeleton): {runtime['peak'] / C.MB:.0f} MB")
    for batch in args.batches:
        for precision in args.precisions:
            for spec in _phases(args, precision, batch):
                spec["source"] = source
                r = peak_rss_of_child(_phase, spec)[0]
                rows.append((spec, r))
                log(f"  b{batch} {precision:<12}{spec['label']:<32}{r['peak'] / C.MB:>9.0f} MiB ({r['seconds']:.0f} s)")
        if args.streaming:
            for kind, extra in (("inference", {}), ("tune", dict(optimizer="zo-mopi", fuse=args.fuse))):
                label = "streamed " + ("inference" if kind == "inference" else "tune zo-mopi")
                spec = dict(common, kind=kind, label=label, precision="fp32", batch=batch, seq=args.seq,
                            streaming=True, logit_elements=args.logit_elements, loss=args.loss, **extra)
                r = peak_rss_of_child(_phase, spec)[0]
                rows.append((spec, r))
                log(f"  b{batch} {'fp32':<12}{label:<32}{r['peak'] / C.MB:>9.0f} MiB ({r['seconds']:.0f} s)")
    return runtime, rows


def _run_inprocess(args, log) -> tuple[dict, list]:
    if args.logit_elements:
        import edgezo.data

        edgezo.data._LOGIT_ELEMENTS = args.logit_elements
    rows = []
    for precision in args.precisions:
        runner = _InProcessRunner(args, precision)
        runner.load()
        for batch in args.batches:
            for spec in _phases(args, precision, batch):
                r = runner.phase(spec)
                rows.append((spec, r))
                log(f"  b{batch} {precision:<12}{spec['label']:<32}{r['peak'] / C.MB:>9.0f} MiB ({r['seconds']:.1f} s)")
        runner.model = None
        runner._free()
    return {"peak": 0}, rows


def _report(args, title: str, runtime: dict, rows: list) -> dict:
    inf = {(s["precision"], s["batch"]): r["peak"] for s, r in rows
           if s["kind"] == "inference" and not s.get("nocache") and not s.get("streaming")}
    inf_nc = {(s["precision"], s["batch"]): r["peak"] for s, r in rows if s["kind"] == "inference" and s.get("nocache")}
    cuda = args.device == "cuda"
    unit = "GPU allocated (weights + phase)" if cuda else "RSS (runtime + weights + phase)"
    print(f"\n{title}: seq {args.seq}, {args.device}, peak {unit} in MiB; "
          f"tune rows fuse={_fuse_name(args.fuse)} unless noted")
    hdr = (f"{'batch':>5}  {'precision':<12}{'phase':<32}{'slices/fwd':>10}{'weights':>9}{'at start':>9}{'peak':>9}"
           f"{'rise':>8}{'state':>8}{'/ infer':>8}{'/ no-cache':>11}{'sec':>7}")
    print(hdr)
    print("-" * len(hdr))
    out_rows, headline = [], {}
    runtime_peak = runtime["peak"]
    for spec, r in rows:
        p, b = spec["precision"], spec["batch"]
        streamed = spec.get("streaming", False)
        ratio = r["peak"] / inf[p, b] if (p, b) in inf and not streamed else None
        ratio_nc = r["peak"] / inf_nc[p, b] if (p, b) in inf_nc and not streamed else None
        spf = r.get("slices_per_forward", 1)
        state = r.get("state_bytes", 0)
        print(f"{b:>5}  {p:<12}{spec['label']:<32}{spf:>10}{r['weight_bytes'] / C.MB:>9.0f}{r['start'] / C.MB:>9.0f}"
              f"{r['peak'] / C.MB:>9.0f}{(r['peak'] - r['start']) / C.MB:>8.0f}{state / C.MB:>8.0f}"
              f"{_fmt(ratio):>8}{_fmt(ratio_nc):>11}{r['seconds']:>7.0f}")
        row = dict(precision=p, batch=b, phase=spec["label"], fuse=spec.get("fuse"), slices_per_forward=spf,
                   peak_bytes=r["peak"], start_bytes=r["start"], load_peak_bytes=r["load_peak"],
                   weight_bytes=r["weight_bytes"], state_bytes=state, seconds=round(r["seconds"], 2),
                   ratio_vs_inference=_round(ratio), ratio_vs_nocache=_round(ratio_nc))
        if streamed and runtime_peak:  # weight_bytes: the whole fp32 checkpoint
            row["stream_ratio"] = round((r["peak"] - runtime_peak) / r["weight_bytes"], 4)
            row["stream_peak_over_weights"] = round(r["peak"] / r["weight_bytes"], 4)
        out_rows.append(row)
    print()
    for b, p in [(b, p) for b in args.batches for p in args.precisions]:
        key = p if len(args.batches) == 1 else f"{p}@b{b}"
        mine = [r for r in out_rows if r["precision"] == p and r["batch"] == b]
        mopi = next((r for r in mine if r["phase"] == "tune zo-mopi"), None)
        if mopi and mopi["ratio_vs_inference"] is not None:
            met = mopi["ratio_vs_inference"] <= TARGET
            headline[key] = dict(inference_peak_bytes=inf.get((p, b)), inference_nocache_peak_bytes=inf_nc.get((p, b)),
                               zo_mopi_peak_bytes=mopi["peak_bytes"], zo_mopi_ratio=mopi["ratio_vs_inference"],
                               zo_mopi_ratio_nocache=mopi["ratio_vs_nocache"], zo_mopi_state_bytes=mopi["state_bytes"],
                               target_met=met if p in DENSE else None)
            tag = ("MET" if met else "MISSED") if p in DENSE else "(not a dense base)"
            print(f"target {p} b{b}: zo-mopi peak / inference peak = {mopi['ratio_vs_inference']:.3f} "
                  f"(<= {TARGET}: {tag}); vs no-cache forward {_fmt(mopi['ratio_vs_nocache'])}; "
                  f"state {mopi['state_bytes'] / C.MB:.0f} MB")
        for r in mine:
            if r["phase"].startswith("tune") and r["phase"] != "tune zo-mopi":
                headline.setdefault(key, {})[r["phase"].removeprefix("tune ") + "_ratio"] = r["ratio_vs_inference"]
    streamed = [r for r in out_rows if "stream_ratio" in r]
    for r in streamed:
        print(f"b{r['batch']} {r['phase']}: (peak - runtime {runtime_peak / C.MB:.0f} MB) / fp32 weights = {r['stream_ratio']:.3f}; "
              f"peak / weights = {r['stream_peak_over_weights']:.3f}")
        headline.setdefault("streaming", {})[f"{r['phase']} b{r['batch']}"] = dict(peak_bytes=r["peak_bytes"], ratio=r["stream_ratio"],
                                                                 peak_over_weights=r["stream_peak_over_weights"])
    return dict(headline=headline, rows=out_rows, runtime_bytes=runtime_peak)


def _fuse_name(f):
    return "all" if f is None else str(f)


def _fmt(x):
    return "-" if x is None else f"{x:.3f}"


def _round(x):
    return None if x is None else round(x, 4)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("synthetic", "smollm2", "both"), default="synthetic",
                    help="random-init --shape model, the real SmolLM2-135M (demo GGUF), or both")
    ap.add_argument("--shape", default="llama-350m", help="synthetic shape (edgezo.runtime.synthetic.SHAPES)")
    ap.add_argument("--vocab", type=int, help="vocabulary (default: the real model's, e.g. 32000 for llama-350m)")
    ap.add_argument("--layers", type=int, help="fewer decoder layers, for quick checks")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", "--dtype", dest="precision_list", action="append",
                    help="precision(s) to measure (repeat or comma-separate); default cpu: fp32,bf16,quanto-int8; "
                         "cuda: fp16")
    ap.add_argument("--batch", default="8", help="batch size(s), comma-separated")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--optimizers", default="zo-mopi,zo-muon,lozo,mezo")
    ap.add_argument("--fuse", default="1", help="slices per forward for the tune rows: an integer or 'all'")
    ap.add_argument("--no-fused-row", dest="fused_row", action="store_false",
                    help="skip the extra zo-mopi fuse=all row (first precision only)")
    ap.add_argument("--state-dtypes", default="", help="extra zo-mopi rows with its basis P, momentum M and V "
                    "stored in these dtypes (state_dtype), comma-separated (bf16, fp16)")
    ap.add_argument("--offload-state", action="store_true", help="CUDA: extra zo-mopi rows with the state in "
                    "host memory (offload_state), fp32 and each --state-dtypes")
    ap.add_argument("--no-nocache", action="store_true", help="skip the use_cache=False inference row")
    ap.add_argument("--no-streaming", dest="streaming", action="store_false")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per phase (CPU)")
    ap.add_argument("--no-pin", action="store_true", help="leave glibc's mmap threshold dynamic")
    ap.add_argument("--inprocess", action="store_true", help="CPU: all phases in this process, peaks sampled by "
                    "PeakMemory (quick, less exact; CUDA always runs this way)")
    ap.add_argument("--loss", choices=("edgezo", "minimal"), default="edgezo",
                    help="tune loss: edgezo.data.make_loss (default), or bench.common.minimal_lm_loss, the same "
                         "computation with contiguous LM-head chunks of --logit-elements (default 2**23)")
    ap.add_argument("--logit-elements", type=int, help="fp32 logits per LM-head call of the tune loss (edgezo: "
                    "overrides edgezo.data._LOGIT_ELEMENTS, 2**23)")
    args = ap.parse_args(argv)
    args.vocab = args.vocab or C.VOCAB.get(args.shape)
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    args.state_dtypes = [d for d in args.state_dtypes.split(",") if d]
    args.batches = [int(b) for b in args.batch.split(",")]
    args.fuse = None if args.fuse == "all" else int(args.fuse)
    if args.precision_list:
        args.precisions = [p for item in args.precision_list for p in item.split(",") if p]
    else:
        args.precisions = ["fp32", "bf16", "quanto-int8"] if args.device == "cpu" else ["fp16"]
    if args.device == "cuda" or args.inprocess:
        args.streaming = False
    C.set_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    results = {}
    t0 = time.perf_counter()
    sources = {"synthetic": ["synthetic"], "smollm2": ["smollm2"], "both": ["synthetic", "smollm2"]}[args.model]
    if args.device == "cuda" or args.inprocess:
        sources = ["synthetic"]  # the real SmolLM2 rows are a CPU (per-process RSS) measurement
    for source in sources:
        if source == "synthetic":
            if args.device == "cuda" or args.inprocess:
                runtime, rows = _run_inprocess(args, log)
            else:
                folder = C.synthetic_folder(args.shape, args.vocab, args.layers)
                log(f"model folder: {folder}")
                runtime, rows = _run_cpu(args, str(folder), log)
            params = C.param_count(args.shape, args.vocab, args.layers)
            title = (f"{args.shape} (random init, {params / 1e6:.0f}M params, vocab {args.vocab}"
                     f"{f', {args.layers} layers' if args.layers else ''})")
        else:
            runtime, rows = _run_cpu(args, "smollm2", log)
            title = f"SmolLM2-135M-Instruct (demo GGUF, {rows[0][1]['params'] / 1e6:.0f}M params)"
        results[source] = _report(args, title, runtime, rows)
    final = dict(bench="memory", device=args.device, batch=args.batches, seq=args.seq, fuse=args.fuse,
                 loss=args.loss, logit_elements=args.logit_elements,
                 fuse_note="tune rows use this many slices per forward (null = all slices in one forward)",
                 threads=args.threads, pinned_heap=not args.no_pin, seconds=round(time.perf_counter() - t0, 1),
                 target=f"dense zo-mopi tune peak <= {TARGET} x inference peak",
                 **{src: dict(shape=args.shape if src == "synthetic" else "smollm2-135m", **res["headline"],
                              runtime_bytes=res["runtime_bytes"]) for src, res in results.items()})
    if args.device == "cuda":
        final["gpu"] = torch.cuda.get_device_name()
    C.emit(final)
    return final


if __name__ == "__main__":
    main()
