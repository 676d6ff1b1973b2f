"""Seeded Gaussian probes: regenerated on demand, never stored (the MeZO trick).

Every random draw owns its generator, keyed by (run seed, step, target, block, purpose); a step's N
probes of one target are one block drawn at once (edgezo.delta.DeltaTarget.probe_chunks). A draw
therefore can never shift another draw's stream: the refresh of a basis and the probes of a step are
independent streams, and the update regenerates exactly the block the forward used (this is what
makes bugs B1-B3 of the released code impossible here).
"""

from __future__ import annotations

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
