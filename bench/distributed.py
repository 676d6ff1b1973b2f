"""Step time and throughput of ZO-MOPI over torch.distributed at 1 and 2 processes, and the bytes on the wire.

    python bench/distributed.py                                    # CPU, gloo, one thread per process
    python bench/distributed.py --device cuda --shape opt-1.3b --dtype fp16 --batch 32 --seq 128   # nccl, 2 GPUs

Every process builds the same random-init model (edgezo.runtime.synthetic.make_model), attaches the
delta and runs --warmup, then --steps timed zo-mopi steps (all slices fused in one forward) with the
token loss of edgezo.data. Runs: one process on --batch rows; `data` over 2 processes, each on its own
--batch rows (the global batch doubles, so does the work); `probe` over 2 processes on the one-process
batch, each evaluating half of the slices. tokens/s = global batch tokens per second of step time.

`gather us` is one all_gather of a step's loss vector, timed back to back after the steps: the
wire's share of a step. Bytes per step are what one rank sends (edgezo.distributed's convention: its own part of each
collective): the slice losses, against the gradient a first-order DDP step all-reduces, counted the
same way (trainable parameters × bytes per gradient element; a ring all-reduce moves about twice
that per rank): full fine-tuning (every parameter), and a LoRA of the same rank on the same Linears.
Prints a table; the last line is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edgezo.data import TaskData, make_loss
from edgezo.delta import DeltaModel
from edgezo.distributed import make_parallel
from edgezo.optim import make_optimizer
from edgezo.runtime.synthetic import SHAPES, make_model

# a ~20M-parameter Llama: big enough that CPU step time is compute, small enough for a quick CPU run
BENCH_SHAPES = {**SHAPES, "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                        num_attention_heads=6)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    arch = "opt" if args.shape.startswith("opt") else "llama"
    return make_model(arch, args.vocab, seed=0, **BENCH_SHAPES[args.shape]).to(DTYPES[args.dtype]).to(device)


def _batch(rows: int, args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, args.vocab, (rows, args.seq), generator=torch.Generator().manual_seed(1))
    target = torch.ones_like(ids, dtype=torch.bool)
    target[:, 0] = False  # every token but the first is scored, as for task lm
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": target}
    return {k: v.to(device) for k, v in batch.items()}


def _worker(rank: int, world: int, mode: str, port: int, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    parallel = None
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=600))
        parallel = make_parallel(mode)
    model = _build(args, device)
    delta = DeltaModel.attach(model)
    opt = make_optimizer("zo-mopi", delta, seed=0, rank=args.rank, k=args.k, n_probes=args.n_probes,
                         parallel=parallel)
    rows = args.batch * world if mode == "data" else args.batch  # data: each rank keeps --batch rows
    batch, loss = _batch(rows, args, device), make_loss(TaskData("lm", [], [], None, None))
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and parallel:
            parallel.sent = 0
        start = time.perf_counter()
        opt.step(loss, batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    sent = parallel.sent / args.steps if parallel else 0
    latency = _gather_latency(parallel, args.n_probes + 1) if parallel else 0.0
    if rank == 0:
        step_s = statistics.median(times[args.warmup :])
        (out / f"{mode}{world}.json").write_text(json.dumps({"step_s": step_s, "tokens_per_s": rows * args.seq / step_s,
                                                             "bytes_per_step": sent, "gather_s": latency}))
    if parallel:
        dist.destroy_process_group()


def _gather_latency(parallel, slices: int, repeats: int = 50) -> float:
    """Seconds per all_gather of a step's loss vector, back to back (the wire's share of a step)."""
    losses = torch.zeros(slices, dtype=torch.float64)
    parallel.gather(losses)
    start = time.perf_counter()
    for _ in range(repeats):
        parallel.gather(losses)
    return (time.perf_counter() - start) / repeats


def _run(world: int, mode: str, args: argparse.Namespace, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, mode, port, args, out), nprocs=world)
    return json.loads((out / f"{mode}{world}.json").read_text())


def _ddp_bytes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(parameters, bytes of a full fine-tuning DDP gradient, bytes of a LoRA rank-r DDP gradient)."""
    with torch.device("meta"):
        model = _build(args, torch.device("meta"))
    grad_bytes = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    params = sum(p.numel() for p in model.parameters())
    lora = sum(args.rank * (t.in_features + t.out_features) for t in DeltaModel.attach(model).targets)
    return params, params * grad_bytes, lora * grad_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="small", choices=sorted(BENCH_SHAPES))
    ap.add_argument("--vocab", type=int, default=None, help="default: 50272 for OPT shapes, 8192 otherwise")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=4, help="rows per process")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--rank", type=int, default=16, help="zo-mopi subspace rank")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n-probes", type=int, default=8)
    args = ap.parse_args()
    args.vocab = args.vocab or (50272 if args.shape.startswith("opt") else 8192)

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: _run(world, mode, args, Path(tmp)) for name, world, mode in
                (("1 process", 1, "single"), ("data x2", 2, "data"), ("probe x2", 2, "probe"))}
    params, full, lora = _ddp_bytes(args)
    base = runs["1 process"]
    print(f"{args.shape} ({params / 1e6:.1f}M params, {args.dtype}, {args.device}), zo-mopi N={args.n_probes} "
          f"rank {args.rank}, {args.batch}x{args.seq} tokens per process")
    print(f"{'run':<12}{'step s':>10}{'tokens/s':>12}{'speedup':>9}{'bytes/step':>12}{'gather us':>11}")
    for name, r in runs.items():
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{name:<12}{r['step_s']:>10.4f}{r['tokens_per_s']:>12.0f}{speedup:>9.2f}{r['bytes_per_step']:>12.0f}"
              f"{r['gather_s'] * 1e6:>11.0f}")
    zo = runs["data x2"]["bytes_per_step"]
    print(f"first-order DDP all-reduce per step: full fine-tuning {full:,} B ({full / zo:,.0f}x edgezo's {zo:.0f} B), "
          f"LoRA rank {args.rank} {lora:,} B ({lora / zo:,.0f}x)")
    print(json.dumps({
        "shape": args.shape, "device": args.device, "dtype": args.dtype, "params": params,
        "tokens_per_process": args.batch * args.seq, "step_s": {k: round(r["step_s"], 5) for k, r in runs.items()},
        "tokens_per_s": {k: round(r["tokens_per_s"], 1) for k, r in runs.items()},
        "speedup_data_x2": round(runs["data x2"]["tokens_per_s"] / base["tokens_per_s"], 3),
        "speedup_probe_x2": round(runs["probe x2"]["tokens_per_s"] / base["tokens_per_s"], 3),
        "zo_bytes_per_step": {"data": zo, "probe": runs["probe x2"]["bytes_per_step"]},
        "gather_us": round(runs["data x2"]["gather_s"] * 1e6, 1),
        "ddp_bytes_per_step": {"full": full, f"lora_r{args.rank}": lora},
    }))


if __name__ == "__main__":
    main()
