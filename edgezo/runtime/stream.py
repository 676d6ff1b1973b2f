"""Layer streaming: fine-tune a model whose decoder blocks do not fit in memory.

Embeddings, final norm and lm_head stay resident. Each decoder block lives on the meta device; a
forward pre-hook reads it from the safetensors file(s) just before it runs and a forward hook puts
it back on meta right after. With prefetch, a background thread reads block i+1 while block i
computes: at most two blocks are in memory. Only tensors are swapped, never modules, so the delta
path's hooks on the inner Linears keep working. Nothing is written back.

What counts in RSS: a touched page of safetensors' mmap stays in the process RSS until the whole
mapping is dropped, and malloc keeps freed blocks in its per-thread arenas. So a block is read with
`readinto` into a private anonymous mapping, unmapped as soon as its last tensor is dropped; the
file's pages stay only in the kernel page cache (reclaimable, not RSS). Quantized precisions are
not streamed.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from edgezo.dtypes import FLOAT_DTYPES
from edgezo.errors import EdgezoError
from edgezo.runtime.load import LoadedModel, resolve_folder

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
STREAM_PRECISIONS = FLOAT_DTYPES  # streaming reads unquantized weights only
_CHUNK = 1 << 30  # Linux caps one read() at ~2 GiB
_ALIGN = 64  # byte alignment of each tensor inside a block's mapping

Slot = tuple[nn.Module, str, str, bool]  # (owner module, attribute, name or file key, is a parameter)


class _Entry(NamedTuple):
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte range in the file
    end: int


class SafetensorsReader:
    """Where each tensor of a folder's safetensors file(s) lies; reads copy into owned memory."""

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.folder, self.prefix = Path(folder), prefix  # prefix: the model's base_model_prefix
        self.entries: dict[str, _Entry] = {}
        for path in self._files():
            self.entries.update(_parse_header(path))

    def _files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():  # sharded: the index names the shards
            return [self.folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if (self.folder / "model.safetensors").exists():
            return [self.folder / "model.safetensors"]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise EdgezoError(f"no .safetensors file in {self.folder}; layer streaming needs safetensors weights")
        return files

    def key(self, name: str) -> str | None:
        """The file's key for a model tensor name (checkpoints may omit or add the base-model prefix)."""
        p = self.prefix + "."
        for cand in (name, name[len(p):] if name.startswith(p) else None, p + name):
            if cand in self.entries:
                return cand
        return None

    def check(self, name: str, key: str, like: torch.Tensor) -> None:
        if self.entries[key].shape != tuple(like.shape):
            raise EdgezoError(f"{name}: checkpoint shape {self.entries[key].shape} != model shape {tuple(like.shape)}")

    def read(self, keys: list[str], dtype: torch.dtype | None = None, device="cpu") -> list[torch.Tensor]:
        """The tensors, floating ones cast to `dtype`, all inside one fresh anonymous mapping."""
        entries = [self.entries[k] for k in keys]
        dtypes = [dtype if dtype is not None and e.dtype.is_floating_point else e.dtype for e in entries]
        sizes = [math.prod(e.shape) * d.itemsize for e, d in zip(entries, dtypes)]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + -(-size // _ALIGN) * _ALIGN)
        slab, out, files = _anonymous(offsets[-1]), [], {}
        try:
            for key, e, d, off, size in zip(keys, entries, dtypes, offsets, sizes):
                if e.path not in files:
                    files[e.path] = open(e.path, "rb", buffering=0)
                fh, dst = files[e.path], slab[off : off + size]
                if e.dtype == d:
                    _read_into(fh, e, dst, key)
                else:  # cast through a scratch buffer of one tensor
                    raw = torch.empty(e.end - e.start, dtype=torch.uint8)
                    _read_into(fh, e, raw, key)
                    dst.view(d).copy_(raw.view(e.dtype))
                out.append(dst.view(d).view(e.shape))
        finally:
            for fh in files.values():
                fh.close()
        return out if torch.device(device).type == "cpu" else [t.to(device) for t in out]


def _parse_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    base = 8 + size
    return {name: _Entry(path, _DTYPES[h["dtype"]], tuple(h["shape"]), *(base + o for o in h["data_offsets"]))
            for name, h in header.items()}


def _anonymous(nbytes: int) -> torch.Tensor:
    """uint8 tensor over a private anonymous mmap, unmapped with its last view (malloc where unavailable)."""
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8)


def _read_into(fh, e: _Entry, dst: torch.Tensor, key: str) -> None:
    view, done = memoryview(dst.numpy()).cast("B"), 0
    fh.seek(e.start)
    while done < len(view):
        n = fh.readinto(view[done : done + _CHUNK])
        if not n:
            raise EdgezoError(f"{e.path} ends inside tensor {key!r}: the file is truncated")
        done += n


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the ModuleList of same-class children holding the most parameters."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    if not lists:
        raise EdgezoError(f"{type(model).__name__} has no list of decoder blocks, so it cannot be streamed")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _slots(root: nn.Module, prefix: str):
    """(owner, attribute, full name, is_parameter) for every tensor under `root`."""
    for sub, mod in root.named_modules(prefix=prefix):
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for attr, t in table.items():
                if t is not None:
                    yield mod, attr, f"{sub}.{attr}".lstrip("."), is_param


def _get(mod: nn.Module, attr: str, is_param: bool) -> torch.Tensor:
    return (mod._parameters if is_param else mod._buffers)[attr]


def _set(mod: nn.Module, attr: str, t: torch.Tensor, is_param: bool) -> None:
    if is_param:  # swap the tensor only: the module (and any hook on it) stays the same object
        mod._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def materialize_resident(model: nn.Module, reader: SafetensorsReader, skip: str, dtype, device) -> int:
    """Read every tensor outside `skip` (the block list) from the file; returns the bytes read.

    Non-persistent buffers (rotary `inv_freq`) are not in checkpoints: they get a real placeholder
    that the model's own `_init_weights` refills. Tied weights (lm_head = embeddings) are re-tied.
    """
    wanted, to_init = [], set()
    for mod, attr, name, is_param in _slots(model, ""):
        if name.startswith(skip + "."):
            continue
        key, old = reader.key(name), _get(mod, attr, is_param)
        if key is not None:
            reader.check(name, key, old)
            wanted.append((mod, attr, key, is_param))
        elif not is_param and old.is_meta:
            _set(mod, attr, torch.empty_like(old, device=device), False)
            to_init.add(mod)
    for mod in to_init:
        model._init_weights(mod)
    tensors = reader.read([k for _, _, k, _ in wanted], dtype, device)
    for (mod, attr, _, is_param), t in zip(wanted, tensors):
        _set(mod, attr, t, is_param)
    model.tie_weights()
    tensors_now = [*model.named_parameters(), *model.named_buffers()]
    missing = [n for n, t in tensors_now if t.is_meta and not n.startswith(skip + ".")]
    if missing:
        raise EdgezoError(f"tensors missing from the checkpoint in {reader.folder}: {missing[:5]}")
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StreamStats:
    bytes_read: int = 0  # block bytes read from the files
    blocks_loaded: int = 0
    prefetch_hits: int = 0  # blocks already read (or being read) in the background when needed
    read_s: float = 0.0  # time spent reading blocks, in either thread
    wait_s: float = 0.0  # time the forward waited for a block


class BlockStreamer:
    """Streams the decoder blocks of `model` (their tensors on meta) from the safetensors in `folder`.

    `wrap=True` also prefetches block 0 during the last block, for the next forward (it then stays
    in memory between forwards).
    """

    def __init__(self, model: nn.Module, folder: str | Path | SafetensorsReader, device="cpu",
                 dtype: torch.dtype = torch.float32, prefetch: bool = True, wrap: bool = False):
        self.reader = folder if isinstance(folder, SafetensorsReader) else SafetensorsReader(
            folder, getattr(model, "base_model_prefix", ""))
        self.device, self.dtype, self.wrap = torch.device(device), dtype, wrap
        self.prefix, self.blocks = find_blocks(model)
        self.stats = StreamStats()
        self._slots = [self._block_slots(i, b) for i, b in enumerate(self.blocks)]
        self._meta = [[_get(m, a, p) for m, a, _, p in slots] for slots in self._slots]
        self._loaded: set[int] = set()
        self._pending: tuple[int, Future] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgezo-prefetch") if prefetch else None
        self._handles = []
        for i, block in enumerate(self.blocks):  # a pre-hook on the block runs before any inner Linear
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self._handles.append(block.register_forward_hook(lambda m, a, o, i=i: self._drop(i), always_call=True))

    def _block_slots(self, i: int, block: nn.Module) -> list[Slot]:
        """Block i's tensors with their file keys, checked against the file once, up front."""
        out = []
        for mod, attr, name, is_param in _slots(block, f"{self.prefix}.{i}"):
            key = self.reader.key(name)
            if key is None and is_param:
                raise EdgezoError(f"{name} is not in the checkpoint in {self.reader.folder}")
            if key is not None:  # else a non-persistent buffer, made resident by materialize_resident
                self.reader.check(name, key, _get(mod, attr, is_param))
                out.append((mod, attr, key, is_param))
        return out

    @property
    def block_bytes(self) -> int:
        """Bytes of all blocks in the streaming dtype."""
        entries = [self.reader.entries[k] for slots in self._slots for _, _, k, _ in slots]
        return sum(math.prod(e.shape) * (self.dtype if e.dtype.is_floating_point else e.dtype).itemsize
                   for e in entries)

    def _read(self, i: int) -> list[torch.Tensor]:
        # reads never overlap (_take waits for the pending one first), so stats need no lock
        start, keys = time.perf_counter(), [k for _, _, k, _ in self._slots[i]]
        out = self.reader.read(keys, self.dtype, self.device)
        self.stats.read_s += time.perf_counter() - start
        self.stats.bytes_read += sum(self.reader.entries[k].end - self.reader.entries[k].start for k in keys)
        return out

    def _take(self, i: int) -> list[torch.Tensor]:
        """Block i's tensors: the prefetched ones if they are block i's, else read now."""
        start = time.perf_counter()
        j, fut = self._pending or (None, None)
        self._pending = None
        tensors = fut.result() if fut else None  # always wait: never leave a read in flight
        del fut  # (a future holds on to its result)
        if j == i:
            self.stats.prefetch_hits += 1
        else:
            tensors = None  # drop a prefetch of another block before reading this one
            tensors = self._read(i)
        self.stats.wait_s += time.perf_counter() - start
        return tensors

    def _before(self, i: int) -> None:
        for j in list(self._loaded - {i}):  # a forward that raised may have left a block behind
            self._drop(j)
        for (mod, attr, _, is_param), t in zip(self._slots[i], self._take(i)):
            _set(mod, attr, t, is_param)
        self._loaded.add(i)
        self.stats.blocks_loaded += 1
        nxt = i + 1 if i + 1 < len(self.blocks) else (0 if self.wrap else None)
        if self._pool is not None and nxt is not None:
            self._pending = (nxt, self._pool.submit(self._read, nxt))

    def _drop(self, i: int) -> None:
        for (mod, attr, _, is_param), meta in zip(self._slots[i], self._meta[i]):
            _set(mod, attr, meta, is_param)
        self._loaded.discard(i)

    def detach(self) -> None:
        """Remove the hooks, finish any read in flight and put every block back on meta."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._pending is not None:
            self._pending[1].result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown()
        for i in list(self._loaded):
            self._drop(i)


@dataclass
class StreamedModel(LoadedModel):
    """A LoadedModel whose decoder blocks are streamed; usable wherever a LoadedModel is."""

    streamer: BlockStreamer | None = None
    resident_bytes: int = 0  # embeddings, norms, lm_head: everything outside the blocks
    streamed_bytes: int = 0  # all blocks, in the streaming dtype (what a resident model would add)


def stream_dtype(precision: str | torch.dtype) -> torch.dtype:
    """fp32/fp16/bf16 (or a torch dtype); quantized precisions cannot be streamed."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in STREAM_PRECISIONS:
        raise EdgezoError(
            f"layer streaming supports precision fp32, fp16 or bf16, not {precision!r}; "
            "stream in fp16/bf16, or load the quantized model resident (without streaming)"
        )
    return STREAM_PRECISIONS[precision]


def load_streaming(path: str | Path, precision: str | torch.dtype = "fp32", device: str = "cpu",
                   prefetch: bool = True, wrap: bool = False, cache_dir: Path | None = None) -> StreamedModel:
    """A causal LM (HF folder or .gguf) whose decoder blocks are read from disk at each forward."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype, folder, dev = stream_dtype(precision), resolve_folder(path, cache_dir), torch.device(device)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "quantization_config", None):
        raise EdgezoError(f"{folder} holds a pre-quantized checkpoint; layer streaming reads fp32/fp16/bf16 only")
    with torch.device("meta"):  # the skeleton costs no memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    reader = SafetensorsReader(folder, getattr(model, "base_model_prefix", ""))
    prefix, _ = find_blocks(model)
    resident = materialize_resident(model, reader, prefix, dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise EdgezoError(f"no usable tokenizer in {folder} ({type(err).__name__}); save the tokenizer there") from err
    streamer = BlockStreamer(model, reader, dev, dtype, prefetch, wrap)
    name = {v: k for k, v in STREAM_PRECISIONS.items()}.get(dtype, str(dtype))
    return StreamedModel(model, tokenizer, folder, name, dev, streamer=streamer, resident_bytes=resident,
                         streamed_bytes=streamer.block_bytes)
