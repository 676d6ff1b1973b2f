"""Can the ZO update's probe regeneration run inside a CUDA graph? A feasibility check for the batch-1 target.

    python bench/cuda_graph_rng.py                  # CUDA only; OPT-6.7B-like: 192 targets, r=64, N=8

The update regenerates each target's probe block from a generator of its own (edgezo/zo/probes.py), then
accumulates Ĝ = Σ g_i u_i. On a GPU at batch 1 this is host-bound: a few op calls per target. This script
captures that loop (per-target generators registered with the graph, re-seeded before each replay) and checks:
  1. the graph draws exactly what eager fresh generators with the same seeds draw, for two sets of seeds
     (so the forward, which draws eagerly, and a graphed update would see the same probes);
  2. the wall time of the loop eager against graph replay (seeding included).

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import json
import sys
import time

import torch

TARGETS = [(64, 4096)] * 128 + [(64, 16384)] * 32 + [(64, 4096)] * 32  # q,k,v,o,fc1 in: 4096; fc2 in: 16384
N = 8


def _eager(seeds: list[int], g: torch.Tensor, grads: list[torch.Tensor]) -> None:
    for seed, shape, row in zip(seeds, TARGETS, grads):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        block = torch.randn((N, *shape), generator=gen, device="cuda")
        row.zero_().view(-1).addmv_(block.flatten(1).mT, g)


def main() -> dict:
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_graph_rng.py checks CUDA graphs: run it on a machine with a CUDA GPU")
    dev = "cuda"
    g = torch.randn(N, device=dev)
    grads = [torch.empty(shape, device=dev) for shape in TARGETS]
    seeds = [1_000_003 * i + 7 for i in range(len(TARGETS))]

    # the graph: one registered generator per target, re-seeded on the host before each replay
    gens = [torch.Generator(device=dev) for _ in TARGETS]
    graph = torch.cuda.CUDAGraph()
    for gen in gens:
        graph.register_generator_state(gen)
    static_g = g.clone()
    graph_grads = [torch.empty_like(x) for x in grads]

    def body() -> None:
        for gen, shape, row in zip(gens, TARGETS, graph_grads):
            block = torch.randn((N, *shape), generator=gen, device=dev)
            row.zero_().view(-1).addmv_(block.flatten(1).mT, static_g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        body()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        body()

    def replay(seeds_now: list[int]) -> None:
        for gen, seed in zip(gens, seeds_now):
            gen.manual_seed(seed)
        graph.replay()

    checks = []
    for offset in (0, 12345):
        now = [s + offset for s in seeds]
        _eager(now, g, grads)
        replay(now)
        torch.cuda.synchronize()
        checks.append(all(torch.equal(a, b) for a, b in zip(grads, graph_grads)))

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 20

    eager_s = timed(lambda: _eager(seeds, g, grads))
    graph_s = timed(lambda: replay(seeds))
    print(f"{len(TARGETS)} targets, N={N}, {torch.cuda.get_device_name()}")
    print(f"graph draws == eager draws (two seed sets): {checks}")
    print(f"probe regeneration + Ĝ: eager {1e3 * eager_s:.2f} ms, "
          f"graph replay (seeding included) {1e3 * graph_s:.2f} ms")
    out = {"bench": "cuda_graph_rng", "targets": len(TARGETS), "n_probes": N, "identical": checks,
           "eager_ms": round(1e3 * eager_s, 3), "graph_ms": round(1e3 * graph_s, 3),
           "gpu": torch.cuda.get_device_name()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
