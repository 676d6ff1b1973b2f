"""Activation checkpointing per decoder block: what keeps a backward pass near inference memory."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from edgezo.runtime.stream import find_blocks


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module) -> Iterator[None]:
    """Within: each decoder block keeps only its inputs for the backward and recomputes its activations
    then, one block at a time. Non-reentrant checkpointing: it needs neither train mode (which would turn
    dropout on, as transformers' own gradient_checkpointing does) nor inputs that require grad."""
    _, blocks = find_blocks(model)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again
