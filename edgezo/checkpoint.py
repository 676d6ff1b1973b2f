"""Atomic checkpoints: one safetensors file holding the delta, the optimizer state and the run's metadata.

Written to a temporary file in the same folder, fsynced, then renamed over the old one, so a
process killed at any moment leaves either the previous checkpoint or the new one, never a torn
file. Data order and probes are functions of (seed, step), so step + state is all a resume needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.optim import ZOOptimizer

CHECKPOINT = "checkpoint.safetensors"

def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then fsync and rename tmp over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def save_checkpoint(out_dir: Path, delta: DeltaModel, opt: ZOOptimizer, meta: dict) -> Path:
    """Save everything needed to continue the run exactly; `meta` is extra JSON (e.g. forwards so far)."""
    opt_state = opt.state_dict()
    tensors = {f"delta.{k}": v.contiguous().cpu() for k, v in delta.state_dict().items()}
    tensors.update({f"opt.{k}": v.contiguous().cpu() for k, v in opt_state["tensors"].items()})
    info = {"step": opt_state["step"], "seed": opt_state["seed"], **meta}
    path = Path(out_dir) / CHECKPOINT
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"edgezo": json.dumps(info)}))
    return path

def load_checkpoint(out_dir: Path, delta: DeltaModel, opt: ZOOptimizer) -> dict:
    """Restore delta and optimizer state in place; returns the saved metadata (with `step`)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        raise EdgezoError(f"no checkpoint in {out_dir}; start the run without --resume")
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["edgezo"])
    tensors = load_file(str(path))
    device = delta.targets[0].device
    delta.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("delta.")})
    opt.load_state_dict(
        {"step": info["step"], "seed": info["seed"],
         "tensors": {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("opt.")}}
    )
    return info

def state_hash(delta: DeltaModel, opt: ZOOptimizer) -> str:
    """A digest of all trainable state, for checking that replicas stay identical."""
    h = hashlib.sha256(str(opt.state.step).encode())
    for key, value in sorted({**delta.state_dict(), **opt.state_dict()["tensors"]}.items()):
        h.update(key.encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes: numpy has no bf16
    return h.hexdigest()[:16]

def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records logged after `max_step` (they will be logged again by the resumed run)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= max_step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))
