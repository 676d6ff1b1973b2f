import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgezo.runtime.synthetic import make_model

VOCAB = 97
ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """bench/NAME.py as a module: bench/ is a folder of scripts, not part of the library, importable from the
    repository root as the namespace package `bench` (the way its scripts import each other)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"bench.{name}")


def lm_loss(model, batch, num_slices):
    """Mean next-token cross-entropy of each slice (the engine's LossFn contract)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(num_slices, -1).mean(1)


def token_batch(batch=4, length=12, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g)}


@pytest.fixture(params=["llama", "opt"])
def arch(request):
    return request.param


def tiny(arch="llama", seed=0, dtype=torch.float32):
    return make_model(arch, vocab_size=VOCAB, seed=seed).to(dtype)
