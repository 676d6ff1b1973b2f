"""Trainable state kept in host memory beside a GPU (ZOConfig.offload_state).

At rank 64 the state of a 7B model (ZO-MOPI's P, C, M and V) is 5-8% of its fp16 weights: more than a
GPU that just fits the model has left. With offload_state it lives in pinned host memory and visits the
GPU only while the code that uses it runs: the forward holds the factors of a few decoder blocks
(DeltaModel), the update the coordinates and state of two chunks of targets (ZOOptimizer).

pack() lays out what moves together in one buffer, so that it moves in one copy (visit, write_back).
A Shuttle makes every copy on a CUDA stream of its own, a block or chunk ahead of its use, so the
copies overlap the kernels of the compute stream, which waits only for the copy it is about to read.
Copies back to the host are queued on the same stream after the kernels that produced them, so a later
copy in never reads a stale host tensor. Host code that reads the host tensors themselves
(checkpoints, export, state hashes, packing) calls settle() first.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable

import torch

Tensors = dict[Hashable, torch.Tensor | None]


ALIGN = 16  # bytes: packed tensors start on a boundary any dtype can be viewed from (and vector loads use)


def to_host(value: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy of `value`, pinned where CUDA is present (pinned memory is what copies asynchronously)."""
    if value is None:
        return None
    pinned = torch.cuda.is_available()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
    return host.copy_(value, non_blocking=pinned and value.device.type == "cuda")


def pack(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The tensors laid out one after another in one host buffer (pinned where CUDA is present), as
    views: tensors that are fetched or stored together then move in one copy (visit, write_back)."""
    offsets, end = [], 0
    for value in tensors:
        offsets.append(end)
        end += 0 if value is None else -(-value.numel() * value.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(end, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    out = []
    for value, start in zip(tensors, offsets):
        if value is None:
            out.append(None)
            continue
        view = _typed(buffer, start, value)
        out.append(view.copy_(value))
    return out


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors (same shape and dtype) as one (len, *shape) view, where they lie one right after
    another in one storage (as pack lays out tensors whose size is a multiple of ALIGN); else None."""
    first = tensors[0]
    size = first.numel() * first.element_size()
    if all(t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous() and _storage(t) == _storage(first)
           and t.data_ptr() == first.data_ptr() + i * size for i, t in enumerate(tensors)):
        return _typed(_bytes(first), _offset(first), first, (len(tensors), *first.shape))
    return None


def _typed(buffer: torch.Tensor, start: int, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The bytes of `buffer` from `start` seen as a tensor of like's dtype and shape (or `shape`)."""
    shape = like.shape if shape is None else shape
    return buffer[start : start + math.prod(shape) * like.element_size()].view(like.dtype).view(shape)


def _bytes(value: torch.Tensor) -> torch.Tensor:
    """All of the storage a tensor lies in (pack's buffer, or its own), as bytes."""
    return torch.empty(0, dtype=torch.uint8, device=value.device).set_(value.untyped_storage())


def _storage(value: torch.Tensor) -> int:
    return value.untyped_storage().data_ptr()


def _offset(value: torch.Tensor) -> int:
    """Where the tensor starts in its storage, in bytes."""
    return value.data_ptr() - _storage(value)


def _groups(tensors: Tensors) -> list[list[Hashable]]:
    """The keys of the (non-None) tensors, grouped by the storage they lie in."""
    out: dict[int, list[Hashable]] = {}
    for key, value in tensors.items():
        if value is not None:
            out.setdefault(_storage(value), []).append(key)
    return list(out.values())


def _span(values: list[torch.Tensor]) -> tuple[int, int]:
    """The bytes of their storage that tensors lying in one storage cover, first to last."""
    return (min(_offset(v) for v in values),
            max(_offset(v) + v.numel() * v.element_size() for v in values))


def visit(host: Tensors, device: torch.device) -> Tensors:
    """Device copies of the host tensors (always copies, so nothing done to them reaches the host): one
    copy for the tensors that lie in one storage (a packed buffer), covering them all."""
    out: Tensors = {key: None for key in host}
    for keys in _groups(host):
        values = [host[key] for key in keys]
        low, high = _span(values)
        carried = _bytes(values[0])[low:high].to(device, non_blocking=True, copy=True)
        for key, value in zip(keys, values):
            out[key] = _typed(carried, _offset(value) - low, value)
    return out


def write_back(host: Tensors, visited: Tensors, non_blocking: bool = False) -> Tensors:
    """The host tensors after a visit: written in place where shape and dtype are unchanged (in one copy
    for a storage whose tensors all still lie as visit laid them out), a new host tensor where the visit
    replaced one with another shape (a refresh, a fold). `non_blocking` (pinned host tensors only): the
    copies are queued, not waited for."""
    out: Tensors = {}
    for keys in _groups(host):
        pairs = [(host[key], visited[key]) for key in keys]
        if all(v is not None and v.shape == h.shape and v.dtype == h.dtype and v.is_contiguous()
               and _storage(v) == _storage(pairs[0][1]) for h, v in pairs):
            shifts = {_offset(v) - _offset(h) for h, v in pairs}
            if len(shifts) == 1:  # laid out as on the host: the span goes back in one copy
                shift, (low, high) = shifts.pop(), _span([h for h, _ in pairs])
                target = _bytes(pairs[0][0])[low:high]
                target.copy_(_bytes(pairs[0][1])[low + shift : high + shift], non_blocking=non_blocking)
                out.update({key: host[key] for key in keys})
    for key, value in visited.items():
        if key in out:
            continue
        old = host.get(key)
        if value is None or old is None or old.shape != value.shape or old.dtype != value.dtype:
            out[key] = to_host(value)
        else:
            out[key] = old.copy_(value, non_blocking=non_blocking)
    return out


class Shuttle:
    """Carries offloaded tensors between host memory and one device: on CUDA on a side stream, with
    copies made ahead (fetch_ahead) and taken when used (fetch); elsewhere plain copies.

    Every fetch names a key and the targets whose tensors it carries (`owners`); storing an owner's
    tensors drops the copies held for it, made ahead or kept, as they are stale from then on.
    `host` may be a function giving the tensors, called only when a copy is made.
    """

    KEPT = 2  # fetches held for reuse (fetch(keep=True)): the forward's current and previous block

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: dict[Hashable, tuple[Tensors, torch.cuda.Event, frozenset[int]]] = {}
        self._kept: dict[Hashable, tuple[Tensors, frozenset[int]]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the copies made ahead or kept; later copies wait for the compute stream's work so far
        (host tensors it has just written, e.g. a loaded checkpoint)."""
        self._ahead.clear()
        self._kept.clear()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def fetch_ahead(self, key: Hashable, owners: Iterable[int], host: Tensors | Callable[[], Tensors]) -> None:
        """Start copying the owners' tensors `host` to the device now; fetch(key, ...) takes the copies."""
        if self.stream is None or key in self._ahead or key in self._kept:
            return
        with torch.cuda.stream(self.stream):
            copies = visit(host() if callable(host) else host, self.device)
        self._ahead[key] = (copies, self.stream.record_event(), frozenset(owners))

    def fetch(self, key: Hashable, owners: Iterable[int], host: Tensors | Callable[[], Tensors],
              keep: bool = False) -> Tensors:
        """Device copies of the owners' tensors `host`, usable on the current stream; with `keep`, held
        for later fetches of `key` (the KEPT latest) until an owner's tensors are stored."""
        if key in self._kept:
            return self._kept[key][0]
        if self.stream is None:
            copies = visit(host() if callable(host) else host, self.device)
        else:
            self.fetch_ahead(key, owners, host)  # (on the side stream even now: ordered after earlier stores)
            copies, ready, _ = self._ahead.pop(key)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for value in {_storage(v): v for v in copies.values() if v is not None}.values():
                value.record_stream(compute)  # allocated on the side stream, used and freed on this one
        if keep:
            self._kept[key] = (copies, frozenset(owners))
            while len(self._kept) > self.KEPT:
                del self._kept[next(iter(self._kept))]
        return copies

    def store(self, owners: Iterable[int], host: Tensors, visited: Tensors) -> Tensors:
        """Copy the visited tensors back into the host ones (write_back) once the kernels queued so far
        have produced them, and drop the copies held for these owners."""
        owners = frozenset(owners)
        for held in (self._ahead, self._kept):
            for key in [key for key, value in held.items() if value[-1] & owners]:
                del held[key]
        if self.stream is None:
            return write_back(host, visited)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = write_back(host, visited, non_blocking=True)
        for value in {_storage(v): v for v in visited.values() if v is not None}.values():
            value.record_stream(self.stream)
        return out


def settle(devices: Iterable[torch.device]) -> None:
    """Wait for the copies into host tensors queued on these devices (before the host reads them)."""
    for device in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(device)
