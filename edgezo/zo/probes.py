"""Seeded Gaussian probes: regenerated on demand, never stored (the MeZO trick).

Every random draw owns its generator, keyed by (run seed, step, target, generator, purpose); a step's
N probes of one target come from one generator a probe on CPU and one a block of probes on accelerators
(edgezo.delta.DeltaTarget.probe_seeds). A draw therefore can never shift another draw's stream: the
refresh of a basis and the probes of a step are independent streams, and the update regenerates exactly
the probes the forward used (this is what makes bugs B1-B3 of the released code impossible here).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

_MASK64 = (1 << 64) - 1

# Purposes, so that a basis draw and a probe draw with the same indices never share a stream.
PROBE, BASIS, PROBE_1D = 1, 2, 3  # PROBE_1D: the full-space probes of biases and norms (vector_delta.py)


def derive_seed(*keys: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 over the sequence); order matters."""
    x = 0x9E3779B97F4A7C15
    for k in keys:
        x = (x ^ (int(k) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def gaussian(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An fp32 N(0, I) tensor drawn from a fresh generator seeded with `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


# Draw threads at most (the caller's among them): measured on 2 cores, where torch's OpenMP threads, spinning
# for a while after each parallel op, already contend with them; more cores were not measured.
MAX_DRAW_WORKERS = 4


def draw_workers(device: torch.device | str) -> int:
    """Threads that draw a block's generators side by side (gaussian_rows) on `device`: on CPU one per core
    torch uses, up to MAX_DRAW_WORKERS, as torch draws a tensor's Gaussians on one core; none on
    accelerators (draws are kernels queued in order) or when torch is held to one thread."""
    threads = min(torch.get_num_threads(), MAX_DRAW_WORKERS)
    return threads if torch.device(device).type == "cpu" and threads > 1 else 0


def gaussian_rows(shape: tuple[int, ...], parts: list[tuple[int, int]], device: torch.device | str = "cpu",
                  workers: int = 0) -> torch.Tensor:
    """An fp32 (Σ count, *shape) block whose consecutive rows come from generators of their own: `parts`
    lists (count, seed), and part j's rows equal gaussian((count, *shape), seed). With workers > 1 the
    parts are drawn by that many threads side by side (the caller's among them), into the one block;
    the numbers do not depend on the thread."""
    if len(parts) == 1:  # (one generator: a block on an accelerator, where the host's time per draw counts)
        return gaussian((parts[0][0], *shape), parts[0][1], device)
    rows = [count for count, _ in parts]
    out = torch.empty(sum(rows), *shape, device=device)
    pieces = list(zip(out.split(rows), (seed for _, seed in parts)))

    def fill(share: list[tuple[torch.Tensor, int]]) -> None:
        for piece, seed in share:
            piece.normal_(generator=torch.Generator(device=device).manual_seed(seed))

    workers = min(workers, len(pieces))
    if workers <= 1:
        fill(pieces)
        return out
    shares = [pieces[w::workers] for w in range(workers)]
    waiting = [_pool().submit(fill, share) for share in shares[1:]]
    fill(shares[0])
    for job in waiting:
        job.result()
    return out


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The draw threads, started once (a pool per draw would start threads ~170 times a step)."""
    return ThreadPoolExecutor(MAX_DRAW_WORKERS - 1, thread_name_prefix="edgezo-draw")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's threads
