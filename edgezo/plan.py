"""The memory model: what one run of edgezo needs, item by item, before anything is loaded.

peak = sum(items): runtime, weights, activations, logits, probes, update, optimizer_state, adapter,
streaming_window, allocator. Only config.json (or GGUF metadata) is read; shapes come from an
instance on the meta device. The transient items model the live tensors of one forward as the code
runs today (calibrated on CPU and CUDA: `python tests/test_plan.py` prints the CPU table):
  - activations: decoder-body peak. The MLP's intermediate tensors (out and act(out); gated:
    act(gate), up and their product) dominate, as a hooked Linear adds its delta into its base
    output in place: per token (2|3)·intermediate + ~5·hidden elements; eager attention (and MPS)
    adds 2 score tensors. With the "full" loss (HF's default use_cache=True) every layer's KV cache
    is alive too.
  - logits: what the LM head and the loss add above that. "full": model(ids).logits + cross-entropy
    over all positions = logits, shifted copy, log_softmax (fp32). "scored": edgezo.data's loss (no
    KV cache, lm_head on every row and a few positions per call, ≤ 32 MiB of fp32 logits or one position
    of every row, normalized in place) = one fp32 chunk (and the head's half-precision output) + 2 hidden states.
  - probes: one hooked Linear's fp32 probe block and its slices' perturbed factors.
  - update: what the update (fp32, one chunk of same-shape targets) needs beyond the forward's
    transients, which are freed by then.
  - allocator: on CUDA the caching allocator's slack; on CPU what glibc's heap keeps around a fo-lora
    backward (FO_HEAP_RETAINED), unless the run pins the heap (Settings.pin_heap, pin_heap_threshold).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edgezo.data import _LOGIT_ELEMENTS as LOGIT_CHUNK
from edgezo.delta import DEFAULT_TARGETS, probes_per_block
from edgezo.dtypes import FLOAT_DTYPES
from edgezo.errors import EdgezoError
from edgezo.offload import Shuttle
from edgezo.optim import DEFAULTS, FIRST_ORDER, OPTIMIZERS, FOConfig
from edgezo.optim.base import update_chunk_bytes
from edgezo.vector_delta import find_vectors

GiB = 1 << 30
# Baseline of the process before any model tensor. cpu: RSS of python + torch + transformers + edgezo
# with a first forward's kernels paged in, measured by tests/test_plan.py (torch 2.13, x86-64 Linux).
# cuda: context + cuBLAS workspaces outside the caching allocator, measured on an H100 (CUDA 13).
# mps: an estimate. Profiles of shared-memory devices override it (runtime_gb).
RUNTIME_BYTES = {"cpu": 363 << 20, "cuda": 700 << 20, "mps": 800 << 20}
# The caching allocator reserves more than the live tensors: 22-33% on the H100 by default (4-19%
# with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True). CPU: see FO_HEAP_RETAINED.
ALLOCATOR_SLACK = {"cpu": 0.0, "cuda": 0.3, "mps": 0.3}
# glibc raises its mmap threshold (up to 32 MiB) as large blocks are freed, after which a backward's
# ~1 MiB activations come from the heap, where the autograd graph's small nodes, kept until the backward,
# split the freed space. Per decoder block the heap keeps 3/4 of FO_BLOCK_SAVED, up to a cap (by recompute),
# fitted on glibc 2.36 + torch 2.13 (SmolLM2-135M's shape and a 17M Llama, batch 4-16 x 64-128 tokens:
# within 6%, bench/heap_pin.py, docs/memory.md). glibc 2.39 + torch 2.11 kept far less (64 MiB where this
# says 536): there the plan is high. Zeroth-order steps build no graph: +3% at most. Pinned
# (Settings.pin_heap) the heap keeps none, but every such block is a fresh mapping whose pages fault in.
FO_HEAP_RETAINED = 0.75
FO_HEAP_RETAINED_CAP = {True: 45 << 19, False: 30 << 20}  # bytes per block: 22.5 MiB with recompute, 30 without
FLOAT_BYTES = {name: dtype.itemsize for name, dtype in FLOAT_DTYPES.items()}
QUANT_BYTES = {"bnb-int8": 1.0, "quanto-int8": 1.0, "bnb-nf4": 0.5 + 4 / 64, "quanto-int4": 0.5 + 4 / 128}  # + scales
PRECISIONS = tuple(FLOAT_BYTES) + tuple(QUANT_BYTES)
LOSSES = ("full", "scored")


@dataclass
class Settings:
    """What a run uses; profiles resolve to this."""

    optimizer: str = "zo-mopi"
    rank: int = 64
    k: int = 32
    n_probes: int = 4
    two_sided: bool = True
    interval: int = 100
    batch_size: int = 8
    seq_len: int = 128
    fuse: int | None = None  # slices per forward; None = all of a step's slices in one forward
    precision: str = "fp32"
    device: str = "cpu"
    streaming: bool = False
    adapter_rank: int = 64
    train_1d: bool = False  # also train biases and norms (ZOConfig.train_1d)
    state_dtype: str = "fp32"  # zo-mopi: how P, M and V are stored (ZOMOPI.state_dtype)
    cuda_graph: bool = False  # the update replayed as a CUDA graph (ZOConfig.cuda_graph): its pool stays allocated
    offload_state: bool = False  # factors and method state in host memory (ZOConfig.offload_state)
    loss: str = "full"  # "full": tests' lm_loss (all logits, KV cache on); "scored": edgezo.data's loss
    lora_rank: int = FOConfig.rank  # fo-lora: R of each trained LoRA pair
    recompute: bool = True  # fo-lora: activation checkpointing per decoder block
    scored_tokens: int | None = None  # fo-lora, scored loss: positions scored per row (None: all, the worst case)
    pin_heap: bool = False  # cpu: glibc's heap pinned (runtime.memory.pin_heap_threshold): RSS = live tensors

    @property
    def first_order(self) -> bool:
        return self.optimizer == FIRST_ORDER

    @property
    def slices(self) -> int:
        """Forwards a step costs (fo-lora: forward-equivalents of its forward, recompute and backward)."""
        if self.first_order:
            return dataclasses.replace(FOConfig(), recompute=self.recompute).forwards_per_step
        return 2 * self.n_probes if self.two_sided else self.n_probes + 1

    @property
    def slices_per_forward(self) -> int:
        return 1 if self.first_order else min(self.fuse or self.slices, self.slices)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def optimizer_kwargs(self) -> dict:
        """The make_optimizer overrides these settings imply (only fields the method has)."""
        if self.first_order:
            return {"rank": self.lora_rank, "recompute": self.recompute, "adapter_rank": self.adapter_rank}
        method_fields = {f.name for f in dataclasses.fields(DEFAULTS[self.optimizer][0])}
        out = {k: getattr(self, k) for k in ("rank", "k", "interval") if k in method_fields}
        if "k" in out:  # a searched rank below k: the method would clamp k, and make_optimizer refuses k > rank
            out["k"] = min(self.k, self.rank)
        if "state_dtype" in method_fields and self.state_dtype != "fp32":  # older runs keep their settings
            out["state_dtype"] = self.state_dtype
        out |= {"n_probes": self.n_probes, "two_sided": self.two_sided, "fuse": self.fuse,
                "adapter_rank": self.adapter_rank}
        # only when on: older runs keep their settings
        return out | {key: True for key in ("train_1d", "cuda_graph", "offload_state") if getattr(self, key)}


@dataclass
class MemoryPlan:
    items: dict[str, int]  # bytes per item; they sum to peak_bytes
    peak_bytes: int
    budget_bytes: int | None
    fits: bool | None
    settings: Settings
    advice: str
    host_bytes: int = 0  # offload_state: the optimizer state and adapter, in host memory instead

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes, "fits": self.fits,
                "host_bytes": self.host_bytes,
                "items": dict(self.items), "settings": dataclasses.asdict(self.settings), "advice": self.advice}


@dataclass
class Anatomy:
    """The shapes the memory model needs."""

    params: int  # unique parameter elements (tied embeddings once)
    linear_elems: int  # all Linear weights: the matmul work of one token
    quantizable: int  # Linear weights a quantizer replaces (all but lm_head)
    block_elems: int  # parameters of one decoder block (the streaming unit)
    blocks: int
    targets: list[tuple[int, int]]  # (out, in) of every Linear the delta path trains
    vector_elems: int  # elements of the 1-D parameters train_1d trains (targets' biases, block norms)
    hidden: int
    widest: int  # widest Linear output inside a block (the MLP's intermediate size)
    gated: bool  # two Linears of that width (gate and up) are alive together
    vocab: int
    heads: int
    kv_dim: int
    eager: bool  # attention scores are materialized


def load_config(model):
    """A transformers config from a config object, a HF folder (config.json only) or a .gguf file (metadata)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    path = Path(model).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise EdgezoError(f"cannot read the model config of {path} ({type(err).__name__}: {err}); re-save it") from err
    raise EdgezoError(f"{path} is neither a model folder with config.json nor a .gguf file; pass one of those")


_ANATOMY: dict[str, Anatomy] = {}


def anatomy(config) -> Anatomy:
    """Shapes of `config`'s model, from an instance on the meta device (no memory; cached)."""
    key = f"{config.to_json_string()}{config._attn_implementation}"  # the JSON omits the attention kind
    if key not in _ANATOMY:
        _ANATOMY[key] = _measure_anatomy(config)
    return _ANATOMY[key]


def _measure_anatomy(config) -> Anatomy:
    from transformers import AutoModelForCausalLM

    from edgezo.runtime.stream import find_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    _, blocks = find_blocks(model)
    block0 = [m.out_features for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    if not block0:
        raise EdgezoError(f"{type(model).__name__} has no nn.Linear in its blocks; use a Llama, Qwen2 or OPT-like LM")
    hidden, heads, widest = config.hidden_size, config.num_attention_heads, max(block0)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    head = model.get_output_embeddings()
    targets = [m for n, m in linears.items() if re.search(DEFAULT_TARGETS, n)]
    vectors = find_vectors(model, DEFAULT_TARGETS, targets)
    return Anatomy(
        params=sum(p.numel() for p in model.parameters()),
        linear_elems=sum(m.weight.numel() for m in linears.values()),
        quantizable=sum(m.weight.numel() for m in linears.values() if m is not head),
        block_elems=sum(p.numel() for p in blocks[0].parameters()), blocks=len(blocks),
        targets=[(m.out_features, m.in_features) for m in targets],
        vector_elems=sum(d.numel() for v in vectors for _, d in v.params()),
        hidden=hidden, widest=widest, gated=block0.count(widest) > 1 and widest != hidden,
        vocab=config.vocab_size, heads=heads,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        eager=getattr(config, "_attn_implementation", None) == "eager",
    )


def _validate(s: Settings) -> None:
    for key, valid in (("optimizer", OPTIMIZERS), ("precision", PRECISIONS), ("loss", LOSSES),
                       ("state_dtype", tuple(FLOAT_BYTES))):
        if getattr(s, key) not in valid:
            raise EdgezoError(f"invalid setting {key}={getattr(s, key)!r}; use one of {', '.join(valid)}")
    if s.lora_rank < 1 or (s.scored_tokens is not None and s.scored_tokens < 1):
        raise EdgezoError(f"invalid setting lora_rank={s.lora_rank} or scored_tokens={s.scored_tokens}; use integers >= 1")
    if s.device_type not in RUNTIME_BYTES:
        raise EdgezoError(f"invalid setting device={s.device!r}; use cpu, cuda, cuda:N or mps")
    for key in ("rank", "k", "n_probes", "batch_size", "seq_len", "fuse", "interval", "adapter_rank"):
        value, low = getattr(s, key), 0 if key in ("interval", "adapter_rank") else 1
        if not (key == "fuse" and value is None) and not (type(value) is int and value >= low):
            raise EdgezoError(f"invalid setting {key}={value!r}; use an integer >= {low}")
    if s.cuda_graph and s.device_type != "cuda":
        raise EdgezoError(f"invalid setting: cuda_graph on {s.device}; CUDA graphs need device cuda")
    if s.offload_state and s.device_type != "cuda":
        raise EdgezoError(f"invalid setting: offload_state on {s.device}; it moves the state off a GPU, and "
                          f"on {s.device} the state is in host memory already")
    if s.pin_heap and s.device_type != "cpu":
        raise EdgezoError(f"invalid setting: pin_heap on {s.device}; it pins the CPU heap (glibc): turn it off")
    if s.offload_state and s.cuda_graph:
        raise EdgezoError("invalid setting: cuda_graph with offload_state; turn one off")
    if s.first_order and (s.streaming or s.offload_state or s.cuda_graph or s.train_1d):
        raise EdgezoError("invalid setting: fo-lora with streaming, offload_state, cuda_graph or train_1d; "
                          "fo-lora needs the model resident and trains the LoRA pairs only: turn those off")
    if s.streaming and s.precision in QUANT_BYTES:
        raise EdgezoError(f"invalid setting: streaming with {s.precision}; stream fp32, fp16 or bf16 weights only")


def _compute_bytes(s: Settings) -> int:
    """Bytes of an activation: the float precision, or what load.py computes quantized models in."""
    if s.precision in FLOAT_BYTES:
        return FLOAT_BYTES[s.precision]
    return 4 if s.device_type == "cpu" else 2


def _weights(a: Anatomy, s: Settings, b: int) -> tuple[int, int]:
    """(resident weight bytes, streaming window bytes)."""
    if s.precision in QUANT_BYTES:  # embeddings, norms and lm_head stay in the compute precision
        return int(a.quantizable * QUANT_BYTES[s.precision] + (a.params - a.quantizable) * b), 0
    if s.streaming:  # two blocks in memory at once (one computing, the next prefetched)
        return (a.params - a.blocks * a.block_elems) * b, 2 * a.block_elems * b
    return a.params * b, 0


def _has_adapter(s: Settings) -> bool:
    return s.optimizer != "mezo" and s.adapter_rank > 0 and s.interval > 0  # folds happen at refreshes


# The update's working memory in chunks (stacked Ĝ and state, then the method's temporaries): ZO-MOPI's
# power iteration about doubles it, Newton–Schulz holds about five of it, LOZO and MeZO scale Ĝ in place.
UPDATE_WORKING = {"zo-mopi": 2, "zo-muon": 5, "lozo": 1, "mezo": 1}


def _state(a: Anatomy, s: Settings, b: int) -> tuple[int, int, int, int]:
    """(optimizer state, adapter, forward probe tensors, update transient) bytes.

    State is fp32, except zo-mopi's P, M and V at state_dtype. A hooked Linear's forward holds its fp32
    probe block (DeltaTarget.probe_chunks) and the slices' perturbed factors in the compute dtype; the
    update works in fp32 on one chunk of same-shape targets at a time (ZOOptimizer._update_chunks):
    the stacked Ĝ and state and the method's temporaries (UPDATE_WORKING), plus a probe block. With
    offload_state the factors visit the device too: in the forward those of the decoder blocks held and
    the next one; in the update the coordinates and method state of two chunks, the one computing and
    the next arriving.
    """
    state = adapter = forward = update = 0
    visiting: list[int] = []  # offload_state: each target's factors, which visit the device in the forward
    half = FLOAT_BYTES[s.state_dtype] / 4 if s.optimizer == "zo-mopi" else 1.0  # P, M and V at state_dtype
    chunk_bytes = update_chunk_bytes(torch.device(s.device_type))
    groups: dict[tuple[int, int], list[int]] = {}  # probe shape -> fp32 working bytes of each target
    for m, n in a.targets:
        r = min(s.rank, m, n) if s.optimizer == "lozo" else min(s.rank, m)
        k = min(s.k, r, n)
        state += {"zo-mopi": r * n + half * (m * r + r * n + n * k), "zo-muon": m * r + r * n,
                  "lozo": m * r + r * n, "mezo": m * n}[s.optimizer]
        lora = (m + n) * min(s.adapter_rank, m, n) if _has_adapter(s) else 0
        adapter += lora
        factors = {"zo-mopi": half * m * r + r * n, "mezo": m * n}.get(s.optimizer, m * r + r * n)
        visiting.append(int(4 * (lora + factors)) if s.offload_state else 0)
        shape = {"lozo": (m, r), "mezo": (m, n)}.get(s.optimizer, (r, n))
        probe = shape[0] * shape[1]
        block = _block_bytes(probe, s.n_probes)
        if s.optimizer == "mezo":  # add_probes: the block again in the compute dtype, below fp32
            perturbed = block * b // 4 if b < 4 else 0
        else:  # the slices' perturbed factors
            perturbed = s.slices_per_forward * probe * b
        forward = max(forward, block + perturbed)
        groups.setdefault(shape, []).append(4 * (probe + (r * n + n * k if s.optimizer == "zo-mopi" else 0)))
    for (rows, cols), sizes in groups.items():
        chunk = max(sizes[0], min(chunk_bytes, sum(sizes)))
        drawn = _block_bytes(rows * cols, s.n_probes)
        # offloaded: the chunk's coordinates and state come as a copy, and the next chunk's arrive meanwhile
        update = max(update, (UPDATE_WORKING[s.optimizer] + 2 * s.offload_state) * chunk + drawn)
    # offloaded: the factors of the blocks the forward holds (Shuttle.KEPT) and of the next, coming
    per_block = max(1, len(visiting) // max(1, a.blocks))
    block = max((sum(visiting[i : i + per_block]) for i in range(0, len(visiting), per_block)), default=0)
    forward += (Shuttle.KEPT + 1) * block
    state += a.vector_elems if s.train_1d else 0
    return int(4 * state), 4 * adapter, forward, update


def _block_bytes(probe: int, n_probes: int) -> int:
    """One fp32 block of a target's probes (DeltaTarget.probe_chunks)."""
    return 4 * probe * min(n_probes, probes_per_block(probe))


def _transients(a: Anatomy, s: Settings, b: int) -> tuple[int, int]:
    """(activations, logits): the decoder-body peak and what the head/loss phase adds above it."""
    rows = s.slices_per_forward * s.batch_size
    tokens = rows * s.seq_len
    # the MLP's own widest tensors (out, act(out); gated: act(gate), up, their product); a hooked Linear
    # adds its delta into its base output in place, so the hooks add only rank-sized products
    body = ((2 + a.gated) * a.widest + 5 * a.hidden) * tokens * b
    if a.eager or s.device_type == "mps":  # scores + softmax, rows×heads×seq² fp32 (no fused SDPA)
        body = max(body, 10 * a.hidden * tokens * b + 2 * rows * a.heads * s.seq_len**2 * 4)
    if s.loss == "full":
        kv = 2 * a.blocks * tokens * a.kv_dim * b  # HF's cache of every layer is alive at the end
        head = kv + tokens * (a.hidden + a.vocab) * b
        loss = 4 * a.vocab * (tokens + 2 * rows * (s.seq_len - 1))  # fp32 logits, shifted copy, log_softmax
        return body + kv, max(0, head - body - kv, loss - body - kv)
    # edgezo.data's loss: every row, a few positions per LM-head call; its fp32 logits (normalized in
    # place) and, below fp32, the head's own output
    positions = min(max(1, LOGIT_CHUNK // (rows * a.vocab)), s.seq_len - 1)
    chunk = rows * positions * a.vocab
    return body, max(0, 2 * tokens * a.hidden * b + chunk * (4 + (b if b < 4 else 0)) - body)


# fo-lora's backward: what one decoder block saves for it, per token, in units of the compute dtype
# (Llama-like: the norms' outputs, q/k/v and attention's output and statistics, the MLP's gate, up,
# act(gate) and their product). Calibrated on CPU (tests/test_plan.py; since the delta path adds LoRA
# out of place, the 135M shape without recompute lands 4-8% below it); the plan's activations are this
# for one block (the one recomputed) or all.
FO_BLOCK_SAVED = {"hidden": 4.5, "kv": 2, "widest": 3}


def _fo_state(a: Anatomy, s: Settings) -> tuple[int, int, int, int]:
    """(optimizer state, adapter, 0, 0): Adam's two moments and the gradient of each LoRA pair; the pair
    itself and the scaled copy of B the forward uses."""
    pairs = sum((m + n) * min(s.lora_rank, m, n) for m, n in a.targets)
    scaled_b = sum(m * min(s.lora_rank, m, n) for m, n in a.targets)
    return 4 * 3 * pairs, 4 * (pairs + scaled_b), 0, 0


def _fo_block_saved(a: Anatomy, s: Settings, b: int) -> int:
    """Bytes one decoder block saves for its backward."""
    tokens = s.batch_size * s.seq_len
    saved = int((FO_BLOCK_SAVED["hidden"] * a.hidden + FO_BLOCK_SAVED["kv"] * a.kv_dim
                 + FO_BLOCK_SAVED["widest"] * (1 + a.gated) * a.widest) * tokens * b)
    if a.eager or s.device_type == "mps":  # the attention scores and their softmax are saved too
        saved += 2 * s.batch_size * a.heads * s.seq_len**2 * b
    return saved


def _fo_transients(a: Anatomy, s: Settings, b: int) -> tuple[int, int]:
    """(activations, logits) of a forward and backward: each block's input kept for its recompute (all
    blocks' saved tensors without recomputation), and the loss's logits with their gradient."""
    tokens = s.batch_size * s.seq_len
    saved = _fo_block_saved(a, s, b)
    kept = a.blocks * a.hidden * tokens * b  # the blocks' inputs
    activations = kept + saved + 2 * a.hidden * tokens * b if s.recompute else a.blocks * saved
    if s.loss == "full":  # logits, log-softmax and their gradient, fp32
        return activations, 3 * 4 * tokens * a.vocab
    # edgezo.data's loss recomputes each chunk of logits in the backward: one chunk, its softmax and gradient
    scored = min(s.seq_len - 1, s.scored_tokens or s.seq_len)
    chunk = s.batch_size * min(scored, max(1, LOGIT_CHUNK // (s.batch_size * a.vocab))) * a.vocab
    return activations, 3 * 4 * chunk + 2 * s.batch_size * scored * a.hidden * b


# Settings only a zeroth-order run has: with any of them on, "auto" never picks fo-lora
ZO_ONLY = ("streaming", "offload_state", "train_1d", "cuda_graph")


def first_order_can_run(precision: str, settings: dict) -> bool:
    """Whether fo-lora can run with these settings (a dict of Settings fields): not on quanto weights (their
    backward is not supported here) and with none of ZO_ONLY on."""
    return not precision.startswith("quanto") and not any(settings.get(key) for key in ZO_ONLY)


def choose_optimizer(config, settings: Settings, budget_bytes: int) -> Settings:
    """"auto": fo-lora when its plan of these settings fits the budget (the planner leaves 10% of it free),
    on a CPU with the heap pinned if only that fits; zo-mopi otherwise or where fo-lora cannot run
    (first_order_can_run)."""
    first = dataclasses.replace(settings, optimizer=FIRST_ORDER)
    if first_order_can_run(settings.precision, dataclasses.asdict(settings)):
        for pin in (False, True) if first.device_type == "cpu" and sys.platform.startswith("linux") else (False,):
            chosen = dataclasses.replace(first, pin_heap=pin)
            if plan(config, chosen).peak_bytes <= 0.9 * budget_bytes:
                return chosen
    return dataclasses.replace(settings, optimizer="zo-mopi")


def plan(model, settings: Settings, budget_bytes: int | None = None, runtime_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of fine-tuning `model` (folder, .gguf or config) with `settings`.

    `runtime_bytes` replaces the measured per-device runtime baseline (RUNTIME_BYTES).
    """
    return _plan(anatomy(load_config(model)), settings, budget_bytes, runtime_bytes)


def _plan(a: Anatomy, s: Settings, budget: int | None, runtime: int | None) -> MemoryPlan:
    _validate(s)
    b = _compute_bytes(s)
    weights, window = _weights(a, s, b)
    state, adapter, probes, update = _fo_state(a, s) if s.first_order else _state(a, s, b)
    activations, logits = _fo_transients(a, s, b) if s.first_order else _transients(a, s, b)
    items = {"runtime": RUNTIME_BYTES[s.device_type] if runtime is None else runtime, "weights": weights,
             "activations": activations, "logits": logits, "probes": probes,
             # the update runs after the forward's tensors are freed; a CUDA graph's pool keeps its tensors
             "update": update if s.cuda_graph else max(0, update - activations - logits - probes),
             "optimizer_state": 0 if s.offload_state else state, "adapter": 0 if s.offload_state else adapter,
             "streaming_window": window}
    items["allocator"] = int(ALLOCATOR_SLACK[s.device_type] * (sum(items.values()) - items["runtime"]))
    if s.first_order and s.device_type == "cpu" and not s.pin_heap:
        per_block = min(FO_HEAP_RETAINED * _fo_block_saved(a, s, b), FO_HEAP_RETAINED_CAP[s.recompute])
        items["allocator"] = int(a.blocks * per_block)
    peak = sum(items.values())
    fits = None if budget is None else peak <= budget
    host = state + adapter if s.offload_state else 0
    return MemoryPlan(items, peak, budget, fits, s, _advice(items, peak, budget, s), host)


def _advice(items: dict[str, int], peak: int, budget: int | None, s: Settings) -> str:
    if budget is None:
        return f"needs {peak / GiB:.2f} GiB (no budget given)"
    if peak <= budget:
        return f"fits: needs {peak / GiB:.2f} GiB of {budget / GiB:.2f} GiB ({100 * peak / budget:.0f}%)"
    fixes = {
        "weights": "quantize (quanto-int8, quanto-int4, bnb-nf4) or stream layers (streaming)",
        "activations": "lower batch_size or seq_len, or set fuse=1 (one slice per forward)",
        "logits": "lower batch_size or seq_len, or use the scored loss",
        "optimizer_state": ("lower rank" if s.optimizer != "mezo" else "use zo-mopi instead of mezo")
                           + (", or offload_state (the state in host memory)" if s.device_type == "cuda" else ""),
        "update": "lower rank or n_probes" if s.optimizer != "mezo" else "use zo-mopi instead of mezo",
        "runtime": "raise the memory budget (the runtime alone needs this much)",
        "allocator": ("lower batch_size or seq_len, or pin the heap (pin_heap: slower steps)"
                      if s.device_type == "cpu" else
                      "lower batch_size or seq_len (the caching allocator's slack grows with the tensors)"),
    }
    top = sorted(items, key=items.get, reverse=True)[:2]
    hints = "; ".join(dict.fromkeys(fixes.get(k, f"shrink {k}") for k in top))
    biggest = ", ".join(f"{k} {items[k] / GiB:.2f}" for k in top)
    return f"does not fit: needs {peak / GiB:.2f} GiB > {budget / GiB:.2f} GiB (largest: {biggest} GiB); {hints}"


# largest_fitting's search order, most important first. streaming prefers False (it is slower);
# state_dtype comes after rank (a larger rank with bf16 state beats fp32 state at a smaller one);
# fuse None (every slice in one forward) counts as largest: fuse only trades memory for speed.
# offload_state prefers False in the same way (at small batches a step takes longer): the state leaves
# the GPU only when nothing fits otherwise; pin_heap too (its pages fault in at every step).
PRIORITY = ("streaming", "offload_state", "pin_heap", "seq_len", "batch_size", "n_probes", "rank", "k", "state_dtype",
            "fuse")


def largest_fitting(config, budget_bytes: int, candidates: dict[str, list], base: Settings,
                    runtime_bytes: int | None = None, accept: Callable[[Settings], bool] | None = None
                    ) -> Settings | None:
    """The largest settings that fit `budget_bytes` (and pass `accept`); None when the smallest don't.

    Keys are fixed in PRIORITY order, each to its largest candidate that still fits with every later
    key at its smallest; keys without candidates keep `base`'s value. Memory grows with every key, so
    a larger budget never gives smaller settings (`accept` must be monotone too, like a step count).
    """
    a = anatomy(load_config(config))
    unknown = sorted(set(candidates) - set(PRIORITY))
    if unknown:
        raise EdgezoError(f"cannot search over {unknown}; searchable settings are {', '.join(PRIORITY)}")
    ranked = {k: sorted(set(candidates[k]), key=lambda v, k=k: candidate_size(k, v), reverse=True)
              for k in PRIORITY if candidates.get(k)}  # largest first
    if base.precision in QUANT_BYTES and "streaming" in ranked:
        ranked["streaming"] = [False]  # quantized weights are not streamed
    chosen: dict = {}
    keys = list(ranked)
    for i, key in enumerate(keys):
        smallest_rest = {k: ranked[k][-1] for k in keys[i + 1:]}
        for value in ranked[key]:
            trial = dataclasses.replace(base, **chosen, **{key: value}, **smallest_rest)
            if _plan(a, trial, budget_bytes, runtime_bytes).fits and (accept is None or accept(trial)):
                chosen[key] = value
                break
        else:
            return None
    return dataclasses.replace(base, **chosen)


def candidate_size(key: str, value) -> float:
    """Order of candidates: not streaming > streaming, the same for offload_state; fuse None > any fuse;
    by bytes for state_dtype."""
    if key == "state_dtype":
        return FLOAT_BYTES.get(value, 0)
    if key in ("streaming", "offload_state", "pin_heap"):
        return float(not value)
    return float("inf") if value is None else value


def tune_settings(config, **fixed) -> Settings:
    """The Settings of the run a TuneConfig makes (`edgezo plan` with no MODEL plans the demo's): its
    optimizer's library defaults (edgezo.optim.DEFAULTS, FOConfig) where `config.optim` says nothing.
    `fixed`: other Settings fields (precision, device, loss, ...)."""
    own = {"optimizer": config.optimizer, "batch_size": config.batch_size, "seq_len": config.max_length}
    if config.adapter_rank is not None:
        own["adapter_rank"] = config.adapter_rank
    if config.optimizer == FIRST_ORDER:
        fo = dataclasses.replace(FOConfig(), **config.optim)
        own |= {"lora_rank": fo.rank, "recompute": fo.recompute}
    else:
        method, zo = DEFAULTS[f"{config.optimizer}-released" if config.variant == "released" else config.optimizer]
        values = {**dataclasses.asdict(method), **dataclasses.asdict(zo), **config.optim}
        names = {f.name for f in dataclasses.fields(Settings)} - set(own) - {"adapter_rank", "precision", "device"}
        own |= {k: v for k, v in values.items() if k in names}
    return Settings(**{**own, **fixed})
