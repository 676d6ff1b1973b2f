"""Peak memory measurement for the CLI and the benchmarks.

Two tools, because neither is enough alone:
- `PeakMemory` measures one phase inside a long-lived process. On CUDA it reads the allocator's peak counter; on
  Linux the kernel's RSS high-water mark (VmHWM, reset at entry), exact and free; elsewhere it samples the process
  RSS from a background thread (~1 ms), which misses spikes shorter than that and, on 2 cores, slowed a
  training step by 15-18% (GIL and a core shared with the compute).
- `peak_rss_of_child` runs one phase in a fresh process and reads the kernel's exact high-water mark. On Linux
  that is VmHWM, reset just before the phase (/proc/self/clear_refs): a spawned child's ru_maxrss starts at its
  parent's peak, so ru_maxrss alone would report the parent. Elsewhere it falls back to ru_maxrss.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import resource
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import psutil
import torch

_PROCESS = psutil.Process()


def current_rss_bytes() -> int:
    """Resident set size of this process, in bytes."""
    return _PROCESS.memory_info().rss


def usable_bytes(device: str | torch.device) -> int:
    """Memory this process could grow to now: what it holds plus what the device has free."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available + current_rss_bytes()


def pin_heap_threshold(nbytes: int = 128 << 10) -> bool:
    """Make RSS follow the live tensors (Linux/glibc; False elsewhere), for the rest of the process.

    glibc raises its mmap threshold (up to 32 MiB) as large blocks are freed, then serves blocks below it
    from the heap, which keeps what it freed: a fo-lora step's RSS peaked 1.2-1.6x above the pinned one
    (edgezo.plan.FO_HEAP_RETAINED), a zeroth-order step's ~3%. Pinned at glibc's initial 128 KiB, every
    block >= `nbytes` gets its own mapping, returned to the OS when freed, whose pages fault in again at
    each use: fo-lora steps took 1.1-2.9x as long (bench/heap_pin.py, docs/memory.md).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _maxrss_bytes() -> int:
    """This process's lifetime RSS high-water mark (Linux reports KiB, macOS bytes)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then read `pm.peak_bytes`, `pm.baseline_bytes`, `pm.delta_bytes`.

    CUDA: allocated-tensor bytes (peak of `torch.cuda.max_memory_allocated`). Elsewhere: process RSS, from the
    kernel's high-water mark where it can be reset (`exact`, Linux), else sampled every `interval_s` plus once at
    entry and once at exit.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self.exact = False  # the kernel's high-water mark, not samples
        self.samples = 0  # how many RSS samples the thread took (lets tests wait without a wall clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = self.peak_bytes = torch.cuda.memory_allocated(self.device)
            return self
        for outer in _EXACT_ACTIVE:  # the reset below would hide their peak so far from them
            outer.peak_bytes = max(outer.peak_bytes, _high_water_mark_bytes())
        self.baseline_bytes = self.peak_bytes = current_rss_bytes()
        self.exact = _reset_high_water_mark()
        if self.exact:
            _EXACT_ACTIVE.append(self)
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="edgezo-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
            return
        if self.exact:
            self.peak_bytes = self.read()
            _EXACT_ACTIVE.remove(self)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())  # whatever is still alive at exit counts

    def read(self) -> int:
        """The peak so far, inside the context too (on CUDA the allocator's high-water mark, without a sync)."""
        if self.device.type == "cuda":
            return max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        if self.exact:
            self.peak_bytes = max(self.peak_bytes, _high_water_mark_bytes())
        return self.peak_bytes

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self.samples += 1


_EXACT_ACTIVE: list[PeakMemory] = []  # open contexts reading the kernel's high-water mark, outermost first


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _maxrss_bytes()


def _run_and_measure(fn: Callable[..., Any], args: tuple) -> tuple[Any, int]:
    exact = _reset_high_water_mark()
    result = fn(*args)
    return result, _high_water_mark_bytes() if exact else _maxrss_bytes()


def peak_rss_of_child(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """Run `fn(*args)` in a fresh 'spawn' process; return its result and that process's exact peak RSS in bytes.

    `fn` and `args` must be picklable (a top-level function). The peak includes the child interpreter and
    whatever `fn` imports, so compare phases measured the same way. Exceptions in the child are re-raised here.
    """
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_and_measure, fn, args).result()
