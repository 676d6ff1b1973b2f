"""Export: the PEFT adapter as a GGUF LoRA adapter, for llama.cpp (`--lora`) and Ollama (`ADAPTER`).

The file is what llama.cpp's `convert_lora_to_gguf.py` writes: general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha, general.architecture of the base GGUF, and per target the
pair `<gguf name>.lora_a` (torch shape (r, in)) and `.lora_b` ((out, r)) in f32, named through
gguf's TensorNameMap. llama.cpp computes W·x + alpha/r · B·(A·x), so alpha = r keeps edgezo's scale 1.

Some converters reorder a weight's rows on the way to GGUF (Llama's q/k rows are permuted for its
rope layout; transformers undoes it on load). The same reordering must go onto lora_b, or the
adapter is silently wrong. Rather than a table per architecture, each kind of tensor is checked once
against the base GGUF itself: the dequantized GGUF weight of block 0 must equal the Hugging Face
weight edgezo trained on, as is or row-permuted the Llama way; otherwise export refuses.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from edgezo.checkpoint import atomic_write
from edgezo.errors import EdgezoError

GGUF_ADAPTER = "adapter.gguf"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MATCH = 0.5  # relative error below which a layout matches: quantization noise is ~0.1 even at 2-4 bits,
#               a wrong row order gives ~1.4


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Llama's q/k row order in GGUF (convert_hf_to_gguf.py LlamaModel.permute): per head, the two
    rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF value types (gguf.GGUFValueType) -> struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class _BaseTensor:
    shape: tuple[int, ...]  # ggml order (ne): (in, out) for a Linear weight
    qtype: int
    offset: int  # absolute, in the file


def _read_header(path: Path) -> tuple[dict, dict[str, _BaseTensor]]:
    """The scalar and string fields and the tensor directory of a GGUF file. gguf.GGUFReader builds a
    memmap per array element, ~10 s of CPU for a tokenizer's 50k strings; skipping arrays takes ~0.1 s."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf, pos = memoryview(data), 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    def value(kind: int):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:  # arrays (tokenizer tables) are skipped
            item, n = take("I"), take("Q")
            if item in _SCALARS:
                pos += n * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(n):
                    value(item)
            return None
        return take(_SCALARS[kind])

    if bytes(buf[:4]) != b"GGUF":
        raise EdgezoError(f"{path} is not a GGUF file (no GGUF magic); pass the base model's .gguf")
    pos = 4
    take("I")  # version
    n_tensors, n_fields = take("Q"), take("Q")
    fields = {}
    for _ in range(n_fields):
        key = string()
        fields[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, shape, take("I"), take("Q")))
    align = fields.get("general.alignment") or 32
    start = -(-pos // align) * align
    return fields, {name: _BaseTensor(shape, qtype, start + off) for name, shape, qtype, off in infos}


def _dequantized(path: Path, t: _BaseTensor) -> torch.Tensor | None:
    """A base tensor as fp32 (out, in), or None when gguf cannot dequantize its type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rows, row_bytes = int(np.prod(t.shape[1:])), t.shape[0] // block * size
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(rows, row_bytes))
    try:
        return torch.from_numpy(np.ascontiguousarray(dequantize(np.array(raw), qtype))).float().reshape(rows, -1)
    except NotImplementedError:
        return None


def _peft_pairs(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """{module name: (B, A)} with PEFT's scaling folded into B, and the adapter config."""
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        raise EdgezoError(f"no PEFT adapter in {adapter_dir}; pass the --out folder of an `edgezo tune` run")
    cfg = json.loads(config_path.read_text())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        m = _PEFT_KEY.match(key)
        if m is None:  # trained biases or norms: a llama.cpp adapter holds LoRA pairs only
            raise EdgezoError(f"{adapter_dir} holds trained biases or norms ({key}), which a llama.cpp LoRA "
                              "adapter cannot hold; tune without train_1d for a GGUF adapter")
        parts.setdefault(m["module"], {})[m["ab"]] = tensor.float()
    scale = cfg["lora_alpha"] / cfg["r"]
    return {name: (scale * p["B"], p["A"]) for name, p in parts.items()}, cfg


def _hf_weight(folder: Path, name: str) -> torch.Tensor | None:
    """The base weight `name` from a safetensors folder (read lazily), or None."""
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name).float()
    return None


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _row_order(gguf_weight: torch.Tensor | None, hf_weight: torch.Tensor, heads: list[int]):
    """The function that takes an HF weight's rows to the GGUF tensor's order (identity or a Llama
    permutation), judged on the dequantized GGUF tensor; None when no candidate matches."""
    if gguf_weight is None or gguf_weight.shape != hf_weight.shape:
        return None
    candidates = [lambda w: w] + [lambda w, h=h: permute_rows(w, h) for h in heads if hf_weight.shape[0] % (2 * h) == 0]
    errors = [_relative_error(fn(hf_weight), gguf_weight) for fn in candidates]
    best = int(np.argmin(errors))
    return candidates[best] if errors[best] < _MATCH else None


def export_gguf_adapter(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path | None = None) -> Path:
    """Write the PEFT adapter in `adapter_dir` as a GGUF LoRA adapter for the base GGUF `base_gguf`
    (default: adapter_dir/adapter.gguf); returns its path."""
    import gguf

    adapter_dir, base_gguf = Path(adapter_dir), Path(base_gguf)
    out = Path(out) if out is not None else adapter_dir / GGUF_ADAPTER
    if not base_gguf.is_file() or base_gguf.suffix.lower() != ".gguf":
        raise EdgezoError(f"base GGUF {base_gguf} is not a .gguf file; pass the GGUF the run was tuned on")
    pairs, cfg = _peft_pairs(adapter_dir)
    hf_folder = Path(cfg["base_model_name_or_path"])
    if not hf_folder.is_dir():
        raise EdgezoError(f"the adapter's base model folder {hf_folder} does not exist; load {base_gguf} with "
                          "edgezo once (it converts it there) or set base_model_name_or_path in adapter_config.json")
    fields, base_tensors = _read_header(base_gguf)
    arch_name = fields.get("general.architecture")
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise EdgezoError(f"the gguf package does not know architecture {arch_name!r} of {base_gguf}; upgrade gguf")
    n_blocks = fields.get(f"{arch_name}.block_count") or 0
    heads = sorted({h for h in (fields.get(f"{arch_name}.attention.head_count"),
                                fields.get(f"{arch_name}.attention.head_count_kv")) if isinstance(h, int) and h})
    names = gguf.get_tensor_name_map(arch, n_blocks)

    tensors, orders = {}, {}
    for module, (b, a) in sorted(pairs.items()):
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        tensor = base_tensors.get(name)
        if tensor is None:  # e.g. lm_head with tied embeddings: the GGUF has no output.weight
            raise EdgezoError(f"target {module} has no tensor in {base_gguf} (looked for "
                              f"{name or 'a GGUF name for it'}); leave it out of the targets for a GGUF adapter")
        if [int(n) for n in tensor.shape[:2]] != [a.shape[1], b.shape[0]]:  # GGUF lists ne: (in, out)
            raise EdgezoError(f"{name} in {base_gguf} is {list(tensor.shape)} but the adapter's {module} is "
                              f"{b.shape[0]}x{a.shape[1]}; pass the GGUF this run was tuned on")
        kind = re.sub(r"^blk\.\d+\.", "", name)
        if kind not in orders:  # one check per kind of tensor, on the first block it appears in
            hf_weight = _hf_weight(hf_folder, f"{module}.weight")
            order = _row_order(_dequantized(base_gguf, tensor), hf_weight, heads) if hf_weight is not None else None
            if order is None:
                raise EdgezoError(f"{name} in {base_gguf} does not hold the weights of {module} in {hf_folder} "
                                  f"(in any known row order); this GGUF is not the run's base, or its "
                                  f"architecture {arch_name!r} stores weights in a layout edgezo cannot export to")
            orders[kind] = order
        tensors[f"{name}.lora_a"] = a.contiguous()
        tensors[f"{name}.lora_b"] = orders[kind](b).contiguous()

    rank = int(cfg["r"])  # all pairs share it (export pads them)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # scale alpha/r = 1: B holds the scale
        writer.add_name(f"{fields.get('general.name') or base_gguf.stem} edgezo LoRA")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in tensors.items():
            writer.add_tensor(key, value.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return out
