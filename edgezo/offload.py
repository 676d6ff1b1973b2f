"""Trainable state kept in host memory beside a GPU (ZOConfig.offload_state).

At rank 64 the state of a 7B model (ZO-MOPI's P, C, M and V) is about 5% of its fp16 weights: more
than a GPU that just fits the model has left. With offload_state it lives in pinned host memory, and
each target's tensors visit the GPU only while the forward hook or the update that uses them runs:
the device then holds one target's factors in the forward, one update chunk's in the update.

Every copy is asynchronous on the current stream, so it is ordered with the kernels around it and
the host never waits for it; host code that reads the tensors themselves (checkpoints, export, state
hashes) calls settle() first.
"""

from __future__ import annotations

from typing import Iterable

import torch


def to_host(value: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy of `value`, pinned where CUDA is present (pinned memory is what copies asynchronously)."""
    if value is None:
        return None
    pinned = torch.cuda.is_available()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
    return host.copy_(value, non_blocking=pinned and value.device.type == "cuda")


def visit(host: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    """Device copies of the host tensors (always copies, so nothing done to them reaches the host)."""
    return {key: None if value is None else value.to(device, non_blocking=True, copy=True)
            for key, value in host.items()}


def write_back(host: dict[str, torch.Tensor | None],
               visited: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The host tensors after a visit: each copied into in place where its shape and dtype are unchanged,
    a new host tensor where the visit replaced it (a refresh, a fold)."""
    out = {}
    for key, value in visited.items():
        old = host.get(key)
        if value is None or old is None or old.shape != value.shape or old.dtype != value.dtype:
            out[key] = to_host(value)
        else:
            out[key] = old.copy_(value, non_blocking=old.is_pinned())
    return out


def settle(devices: Iterable[torch.device]) -> None:
    """Wait for the copies into host tensors queued on these devices (before the host reads them)."""
    for device in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(device)
