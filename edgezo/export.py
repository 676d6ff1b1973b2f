"""Export: the trained delta as a standard PEFT LoRA adapter, and merging it into a dense copy.

Every target's delta (adapter + current window) is refactored to a rank-R pair (B, A) with the same
R for all targets (zero-padded), lora_alpha = R so PEFT's scaling is 1: W_eff = W + B·A exactly as
edgezo computes it. MeZO's full-rank delta is exported at the rank that represents it exactly.
Trained 1-D deltas (train_1d) go in as PEFT keeps them, as whole trained parameters: the targets'
biases with bias="lora_only", the norms as modules_to_save (vector_delta.to_peft).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgezo.checkpoint import atomic_write
from edgezo import vector_delta
from edgezo.delta import FACTORS, DeltaModel, DeltaTarget
from edgezo.errors import EdgezoError
from edgezo.offload import Shuttle

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _lora_pair(target: DeltaTarget, max_rank: int | None,
               shuttle: Shuttle | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, dropped energy) for the whole delta of one target, without changing the target."""
    factors = {key: getattr(target, key) for key in FACTORS}
    if target.offloaded:  # its factors come to its device, where they are factored
        factors = shuttle.fetch(("export", target.index), [target.index], factors)
    with target.holding(factors):
        scratch = copy.copy(target)
    if target.side == "full":  # a dense delta: factor it directly
        scratch.left, scratch.right = scratch.dense.clone(), torch.eye(target.in_features, device=target.device)
        scratch.side = "left"
    dropped = scratch.fold(max_rank)
    return scratch.lora_B, scratch.lora_A, dropped


def export_adapter(delta: DeltaModel, out_dir: str | Path, base_model: str | Path, max_rank: int | None = None) -> dict:
    """Write adapter_config.json + adapter_model.safetensors; returns a summary (rank, dropped energy)."""
    out_dir = Path(out_dir)
    pairs = {t.name: _lora_pair(t, max_rank, delta.shuttle) for t in delta.targets}
    rank = max(1, max(b.shape[1] for b, _, _ in pairs.values()))
    tensors = {}
    for name, (b, a, _) in pairs.items():
        pad = rank - b.shape[1]
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous().cpu()
    vectors, vector_config = vector_delta.to_peft(delta.vectors)
    tensors.update(vectors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_model).resolve()),  # absolute, so merging works from any folder
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(pairs), "inference_mode": True, "init_lora_weights": True,
    }
    if delta.vectors:  # without them the config stays as before
        config.update(vector_config)
    atomic_write(out_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write(out_dir / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return {"rank": rank, "dropped_energy": max(d for _, _, d in pairs.values())}


def load_adapter(delta: DeltaModel, adapter_dir: str | Path) -> None:
    """Load a PEFT LoRA adapter written by `export_adapter` into the delta path (as its adapter part),
    with its trained biases and norms as 1-D deltas (saved − base)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise EdgezoError(f"no {ADAPTER_WEIGHTS} in {adapter_dir}; pass the --out folder of an `edgezo tune` run")
    tensors = load_file(str(path))
    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for t in delta.targets:
        key = f"base_model.model.{t.name}"
        if f"{key}.lora_A.weight" in tensors:
            t.lora_A = tensors[f"{key}.lora_A.weight"].float().to(t.device)
            t.lora_B = scale * tensors[f"{key}.lora_B.weight"].float().to(t.device)
    vectors = vector_delta.from_peft(delta.model, tensors, cfg)
    if vectors:
        delta.add_vectors(vectors)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter as a dense Hugging Face folder (for fp32/fp16/bf16 bases)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise EdgezoError(f"no {ADAPTER_CONFIG} in {adapter_dir}; pass the --out folder of an `edgezo tune` run")
    cfg = json.loads(config_path.read_text())
    base = cfg["base_model_name_or_path"]
    if not Path(base).is_dir():  # else transformers tries the hub, retrying for half a minute
        raise EdgezoError(f"the adapter's base model folder {base} does not exist; restore it, or set "
                          f"base_model_name_or_path in {config_path} to the model folder")
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    if getattr(model.config, "quantization_config", None) is not None:
        raise EdgezoError("cannot merge into a quantized base; export from a fp32/fp16/bf16 model folder")
    delta = DeltaModel.attach(model, pattern="^(" + "|".join(map(re.escape, cfg["target_modules"])) + ")$")
    load_adapter(delta, adapter_dir)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for t in delta.targets:
            weight = modules[t.name].weight
            weight += (t.lora_B @ t.lora_A).to(weight.dtype)
        for v in delta.vectors:
            for param, d in v.params():
                v.base(param).add_(d.to(v.base(param).dtype))
    delta.detach()
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(out_dir)
    return Path(out_dir)
