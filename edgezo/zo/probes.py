"""Seeded Gaussian probes: regenerated on demand, never stored (the MeZO trick).

Every random draw owns its generator, keyed by (run seed, step, target, block, purpose); a step's N
probes of one target are one block drawn at once (edgezo.delta.DeltaTarget.probe_chunks). A draw
therefore can never shift another draw's stream: the refresh of a basis and the probes of a step are
independent streams, and the update regenerates exactly the block the forward used (this is what
makes bugs B1-B3 of the released code impossible here).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")

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


# Draw threads at most: each holds a probe set in memory (measured on 2 cores; more were not measured).
MAX_DRAW_WORKERS = 4


def draw_workers(devices: Iterable[torch.device]) -> int:
    """Threads that draw in parallel (drawn_in_parallel) for probes living on `devices`: on CPU one per
    core torch uses, as torch draws a tensor's Gaussians on one core, up to MAX_DRAW_WORKERS; none on
    accelerators (draws are kernels queued in order) or when torch is held to one thread."""
    devices = list(devices)
    cpu_only = bool(devices) and all(torch.device(d).type == "cpu" for d in devices)
    threads = min(torch.get_num_threads(), MAX_DRAW_WORKERS)
    return threads if cpu_only and threads > 1 else 0


@contextlib.contextmanager
def drawn_in_parallel(jobs: dict[Hashable, Callable[[], T]], workers: int) -> Iterator[Callable[[Hashable], T]]:
    """Yields take(key) -> jobs[key](). A take whose job has not run yet runs it together with the next
    `workers` - 1 jobs (in the dict's order), one per worker thread, and waits for all of them: the
    caller's cores draw side by side, and never while the caller's own torch ops run (drawing beside
    them was measured slower). Each job owns its generator, so what it returns does not depend on the
    thread. A key taken twice runs its job again; workers = 0 runs every job at its take."""
    if workers <= 0:
        yield lambda key: jobs[key]()
        return
    keys = list(jobs)
    position = {key: i for i, key in enumerate(keys)}
    started: set[Hashable] = set()
    ready: dict[Hashable, T] = {}
    with ThreadPoolExecutor(workers, thread_name_prefix="edgezo-draw") as pool:

        def take(key: Hashable) -> T:
            if key in ready:
                return ready.pop(key)
            if key in started:
                return jobs[key]()
            group = [k for k in keys[position[key]:] if k not in started][:workers]
            started.update(group)
            ready.update(zip(group, pool.map(lambda k: jobs[k](), group)))
            return ready.pop(key)

        yield take
