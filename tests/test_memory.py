"""edgezo.runtime.memory: in-process peak (kernel mark or samples) and exact per-child peak (no wall-clock assumptions)."""

from __future__ import annotations

import mmap
import sys
import time

import pytest
import torch

from edgezo.runtime.memory import PeakMemory, current_rss_bytes, peak_rss_of_child

MB = 1_000_000
N_FLOATS = 50_000_000  # 200 MB of float32


def fresh_pages(nbytes: int = 4 * N_FLOATS) -> mmap.mmap:
    """nbytes of newly mapped, touched memory: RSS must rise by all of it (a malloc'd tensor may reuse
    pages an earlier test freed but the heap kept resident)."""
    buf = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        buf[offset] = 1
    return buf


def _allocate_and_sum(n: int) -> float:
    x = torch.ones(n)  # ones, not empty: the pages must be touched to count in RSS
    return float(x[::1_000_000].sum())


def test_current_rss_is_positive():
    assert current_rss_bytes() > 10 * MB


def test_peak_memory_sees_allocation_alive_at_exit():
    with PeakMemory("cpu") as pm:
        x = fresh_pages()
    assert pm.peak_bytes - pm.baseline_bytes >= 190 * MB
    assert pm.delta_bytes == pm.peak_bytes - pm.baseline_bytes
    del x


def test_peak_memory_sees_freed_allocation():
    with PeakMemory("cpu") as pm:
        x = fresh_pages()
        seen = pm.samples
        while not pm.exact and pm.samples < seen + 2:  # wait on the sampler's progress, not on a clock
            time.sleep(0.001)
        del x
    assert pm.delta_bytes >= 190 * MB


def test_peak_memory_sampler_where_the_kernel_mark_cannot_be_reset(monkeypatch):
    from edgezo.runtime import memory

    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    with PeakMemory("cpu") as pm:
        assert not pm.exact
        x = fresh_pages()
        seen = pm.samples
        while pm.samples < seen + 2:
            time.sleep(0.001)
        del x
    assert pm.delta_bytes >= 190 * MB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's high-water mark is Linux's")
def test_nested_exact_contexts_keep_the_outer_peak():
    # the inner context resets the kernel's mark: the outer must not lose the spike before it
    with PeakMemory("cpu") as outer:
        assert outer.exact
        x = fresh_pages()
        del x
        with PeakMemory("cpu") as inner:
            pass
        assert outer.read() - outer.baseline_bytes >= 190 * MB
    assert inner.delta_bytes < 100 * MB
    assert outer.delta_bytes >= 190 * MB


def test_peak_rss_of_child_is_at_least_the_allocation():
    result, peak = peak_rss_of_child(_allocate_and_sum, N_FLOATS)
    assert result == 50.0
    assert peak >= 200 * MB


def test_peak_memory_reads_the_cuda_high_water_mark_inside_the_context(monkeypatch):
    # tune logs the peak every step: on CUDA it must not be the value at entry until the context ends
    from edgezo.runtime import memory

    allocated = {"now": 100, "max": 100}
    monkeypatch.setattr(memory.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(memory.torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(memory.torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(memory.torch.cuda, "max_memory_allocated", lambda device=None: allocated["max"])
    with memory.PeakMemory("cuda") as pm:
        allocated["max"] = 5000  # a step ran
        assert pm.read() == 5000
