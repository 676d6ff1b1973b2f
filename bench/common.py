"""Helpers shared by bench/memory.py and bench/speed.py (model folders, batches, losses, timing, output).

The benches measure what a user runs: the plain `model(input_ids=ids).logits` forward for inference, and
one `ZOOptimizer.step` with edgezo's real loss (`edgezo.data.make_loss` of an `lm` TaskData: the decoder on
every position, the LM head only on the scored ones, in chunks) for tuning.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

MB = 1 << 20
GB = 1 << 30

# The optimizer settings the benches compare (the rest are each method's defaults).
OPTIMIZER_SETTINGS: dict[str, dict] = {
    "zo-mopi": dict(rank=64, k=32, n_probes=8, two_sided=False),
    "zo-muon": dict(rank=64, n_probes=8, two_sided=False),
    "lozo": dict(),  # rank 2, one two-sided probe
    "mezo": dict(),  # one two-sided probe, dense delta
}
# Vocabulary of the real model each synthetic shape stands for.
VOCAB = {"llama-350m": 32000, "opt-1.3b": 50272, "opt-6.7b": 50272, "tiny": 512, "smollm2-135m": 49152}
ARCH = {"llama-350m": "llama", "opt-1.3b": "opt", "opt-6.7b": "opt", "tiny": "llama", "smollm2-135m": "llama"}


def set_threads(n: int) -> None:
    """Pin intra-op threads (on a shared 2-core box, 1 thread is the least noisy: OpenMP spin-waits)."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # inherited by spawned children before they import torch


def slice_count(name: str) -> int:
    """Slices (forwards' worth of rows) of one step of optimizer `name` with OPTIMIZER_SETTINGS."""
    from edgezo.optim import DEFAULTS

    cfg = DEFAULTS[name][1]
    n = OPTIMIZER_SETTINGS[name].get("n_probes", cfg.n_probes)
    two = OPTIMIZER_SETTINGS[name].get("two_sided", cfg.two_sided)
    return 2 * n if two else n + 1


# ---------------------------------------------------------------- models


def shape_dims(shape: str, layers: int | None = None) -> dict:
    from edgezo.runtime.synthetic import SHAPES

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    return dims


def model_config(shape: str, vocab: int | None = None, layers: int | None = None):
    """The transformers config of a synthetic shape (built on the meta device: no memory, no init)."""
    from edgezo.runtime.synthetic import make_model

    with torch.device("meta"):
        model = make_model(ARCH[shape], vocab_size=vocab or VOCAB[shape], **shape_dims(shape, layers))
    return model.config


def param_count(shape: str, vocab: int | None = None, layers: int | None = None) -> int:
    """Parameters of a synthetic shape (unique tensors, so tied embeddings count once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(shape, vocab, layers))
    return sum(p.numel() for p in model.parameters())


def build_model(shape: str, vocab: int | None = None, layers: int | None = None, dtype=torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A random-init model of `shape`, initialised directly in `dtype` on `device` (fast on a GPU)."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(shape, vocab, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def synthetic_folder(shape: str, vocab: int | None = None, layers: int | None = None, dtype: str = "fp32",
                     device: str = "cpu", root: str | Path | None = None) -> Path:
    """A saved random-init model (safetensors + local tokenizer) that `load_model` reads; built once, reused.

    Lives under $EDGEZO_BENCH_DIR (default: <tmp>/edgezo-bench), keyed by shape, vocab, layers and dtype.
    """
    from edgezo.runtime.synthetic import make_tokenizer

    vocab = vocab or VOCAB[shape]
    layers_tag = f"-L{layers}" if layers else ""
    root = Path(root or os.environ.get("EDGEZO_BENCH_DIR") or Path(tempfile.gettempdir()) / "edgezo-bench")
    folder = root / f"{shape}-v{vocab}{layers_tag}-{dtype}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = build_model(shape, vocab, layers, dt, device)
    model.save_pretrained(tmp, safe_serialization=True)
    make_tokenizer().save_pretrained(tmp)  # any tokenizer will do: the benches feed random token ids
    del model
    if folder.exists():  # an incomplete folder from an interrupted run
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (quantized tensors at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.shape) if hasattr(t, "data_ptr") else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)  # quanto QTensors: sum their inner tensors
    if inner is not None and type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if data is not t and getattr(data, "__tensor_flatten__", None) is not None and type(data) is not torch.Tensor:
        return _tensor_bytes(data)
    return data.numel() * data.element_size()


def touch_weights(model: torch.nn.Module) -> None:
    """Read one element of every page of every weight, so weights mapped from the checkpoint are resident.

    fp32 loads keep parameters as views of the safetensors mmap: pages join the RSS when first read, and an
    embedding row only when its token occurs. Touching them all makes every phase start from a fully
    resident model (the steady state of a process that has run a while), so peaks differ by the phase alone.
    """
    seen = set()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            _touch(t, seen)


def _touch(t, seen) -> None:
    if t.device.type == "meta" or t.numel() == 0:
        return
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:  # quanto QTensors: their inner tensors
            _touch(getattr(t, name), seen)
        return
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        return _touch(data, seen)
    if data.data_ptr() in seen or not data.is_contiguous():
        return
    seen.add(data.data_ptr())
    flat = data.reshape(-1)
    step = max(1, 4096 // flat.element_size())
    flat[::step].float().sum().item()


def state_bytes(opt) -> int:
    """Persistent tuning state: the delta factors beside every target plus the method's tensors."""
    total = 0
    for target, st in zip(opt.targets, opt.state.per_target):
        for key in ("left", "right", "dense", "lora_A", "lora_B"):
            t = getattr(target, key)
            total += 0 if t is None else t.numel() * t.element_size()
        total += sum(t.numel() * t.element_size() for t in st.values())
    return total


# ---------------------------------------------------------------- data and loss


def lm_batch(vocab: int, batch: int, seq: int, seed: int = 0, device="cpu"):
    """(ids, tune batch, loss): random token rows as an `lm` TaskData, and edgezo's own loss for it."""
    from edgezo.data import Example, TaskData, collate, make_loss

    ids = torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    data = TaskData("lm", [Example([r.tolist()], [[False] + [True] * (seq - 1)]) for r in ids], [], None, None, 0)
    tune = {k: v.to(device) for k, v in collate(data.train, data.pad_id).items()}
    return ids.to(device), tune, make_loss(data)


def minimal_lm_loss(logit_elements: int = 1 << 23):
    """A minimal equivalent of edgezo.data.make_loss for `lm` rows (every token after the first scored).

    The same computation (decoder on every position, LM head on chunks of positions, mean token
    cross-entropy per row, mean per slice), in chunks of at most `logit_elements` fp32 logits (data.py:
    2**23, normalized in place there), each made contiguous before the head. A strided 3-D input (what
    `h.split(chunk, 1)` gives once there are two chunks or more) makes CPU bf16 matmul broadcast the
    head's weight over the rows: rows x vocab x hidden bytes (445 MiB for SmolLM2 at 8 rows).
    """

    def loss(model, batch, num_slices):
        ids = batch["input_ids"]
        out = model.get_decoder()(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False)
        hidden, target = out.last_hidden_state[:, :-1], ids[:, 1:]
        head = model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or model.config.vocab_size
        chunk = max(1, logit_elements // (ids.shape[0] * vocab))
        total = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device)
        for hc, tc in zip(hidden.split(chunk, 1), target.split(chunk, 1)):
            logits = head(hc.contiguous()).float()
            total += (logits.gather(-1, tc[..., None]).squeeze(-1) - logits.logsumexp(-1)).sum(1)
        return (-total / target.shape[1]).view(num_slices, -1).mean(1)

    return loss


def make_opt(model: torch.nn.Module, name: str, fuse: int | None, **extra):
    from edgezo.delta import DeltaModel
    from edgezo.optim import make_optimizer

    return make_optimizer(name, DeltaModel.attach(model), seed=0, fuse=fuse, **{**OPTIMIZER_SETTINGS[name], **extra})


@contextlib.contextmanager
def plain(delta) -> Iterator[None]:
    """The DeltaModel's hooks removed for the duration: the model is the untouched base (a user's forward)."""
    delta.detach()
    try:
        yield
    finally:
        delta.reattach()


@contextlib.contextmanager
def attached(delta) -> Iterator[None]:
    """A detached DeltaModel's hooks in place for the duration (a second optimizer on the same model)."""
    delta.reattach()
    try:
        yield
    finally:
        delta.detach()


# ---------------------------------------------------------------- process memory (Linux)


def vm(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def settle() -> None:
    """Drop garbage and hand freed heap back to the OS, so the RSS at a phase's start is what is live."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def reset_hwm() -> int:
    """VmHWM := current RSS (Linux /proc/self/clear_refs); returns that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm("VmRSS")


# ---------------------------------------------------------------- timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device="cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(obj: dict) -> None:
    """The bench's last line: one JSON object."""
    print(json.dumps(obj), flush=True)
