"""The delta path: every trained Linear computes y = base(x) + delta(x); the base is never written.

The delta of a target W (m×n) has three parts, each applied as thin matmuls:
  - the persistent adapter  B·A            (m×R)(R×n), LoRA-shaped, exported as a PEFT adapter;
  - the current window      L·R            the update accumulated since the last refresh
                                           (subspace methods: L = P basis, R = coordinates C;
                                            LOZO: L = coordinates, R = vᵀ basis; MeZO: dense D);
  - during probing, slice s of the stacked batch adds  scale_s · (probe s of this target),
    with the probe regenerated from its seed inside the forward and dropped right after.
Because the base is only read, the same code serves fp32/fp16/bf16 Linears, bitsandbytes and
quanto quantized Linears, and streamed weights. Biases and norms (train_1d) get the same treatment
in edgezo/vector_delta.py. With offload_state the factors live in host memory and come to the GPU a
decoder block at a time, just ahead of the hooks that use them (edgezo/offload.py).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Collection, Iterator, Literal

import torch
from torch import nn

from edgezo import offload, vector_delta
from edgezo.vector_delta import VectorDelta
from edgezo.zo.probes import PROBE, derive_seed, gaussian_rows
from edgezo.zo.probing import Probing

# The Linears of the decoder blocks (Llama/Qwen `layers.N`, OPT `decoder.layers.N`, GPT-2 `h.N`).
DEFAULT_TARGETS = r"(^|\.)(layers|h|blocks)\.\d+\."

ProbeSide = Literal["right", "left", "full"]

# Probes of one target drawn into one block per batched matmul, at most (fp32 elements: 32 MiB).
PROBE_BLOCK_ELEMENTS = 1 << 23


# A target's tensors: what it saves, and what visits the device when it is offloaded.
FACTORS = ("left", "right", "dense", "lora_A", "lora_B")
# A decoder block's number in a target's name: with offload_state the forward moves a block's factors at a time.
BLOCK = re.compile(r"(^|\.)(layers|h|blocks)\.(\d+)\.")


def probes_per_block(probe_elements: int) -> int:
    """How many probes of `probe_elements` each one block holds (at least one)."""
    return max(1, PROBE_BLOCK_ELEMENTS // probe_elements)


@dataclass
class DeltaTarget:
    """The trainable delta beside one base Linear (the module itself is only read)."""

    index: int
    name: str
    module: nn.Module
    out_features: int
    in_features: int
    device: torch.device = torch.device("cpu")
    side: ProbeSide = "right"
    left: torch.Tensor | None = None  # m×r
    right: torch.Tensor | None = None  # r×n
    dense: torch.Tensor | None = None  # m×n (full-space methods only)
    lora_B: torch.Tensor | None = None  # m×R
    lora_A: torch.Tensor | None = None  # R×n
    offloaded: bool = False  # the factors live in host memory and visit `device` (edgezo/offload.py)

    @contextlib.contextmanager
    def holding(self, factors: dict[str, torch.Tensor | None]) -> Iterator[None]:
        """Within: these tensors as the factors (an offloaded target's device copies), then its own again."""
        own = {key: getattr(self, key) for key in factors}
        for key, value in factors.items():
            setattr(self, key, value)
        try:
            yield
        finally:
            for key, value in own.items():
                setattr(self, key, value)

    @property
    def coords_key(self) -> str:
        return {"right": "right", "left": "left", "full": "dense"}[self.side]

    def probe_shape(self) -> tuple[int, int]:
        if self.side == "right":
            return (self.left.shape[1], self.in_features)
        if self.side == "left":
            return (self.out_features, self.right.shape[0])
        return (self.out_features, self.in_features)

    def coords(self) -> torch.Tensor:
        """The window factor that the probes perturb and the update steps (its shape is probe_shape())."""
        return getattr(self, self.coords_key)

    def probe_chunks(self, step_seed: int, n_probes: int, device: torch.device, wanted: Collection[int] | None = None,
                     workers: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """This target's probes of a step (all N, or those `wanted` among them and any that share their
        generator), as (index of the first, fp32 block (k, *probe_shape())).

        A block holds up to PROBE_BLOCK_ELEMENTS elements (so MeZO's dense probes come one at a time).
        Its rows come from the generators of probe_seeds; `workers` threads draw them side by side (CPU).
        """
        shape = self.probe_shape()
        per_block = probes_per_block(shape[0] * shape[1])
        generators = self.probe_seeds(step_seed, n_probes, device)
        for start in range(0, n_probes, per_block):
            parts = [g for g in generators if start <= g[0] < start + per_block]
            if wanted is not None:  # from the first generator wanted to the last (a forward's are consecutive)
                used = [j for j, (first, count, _) in enumerate(parts)
                        if any(first <= i < first + count for i in wanted)]
                parts = parts[used[0] : used[-1] + 1] if used else []
            if parts:
                yield parts[0][0], gaussian_rows(shape, [(count, seed) for _, count, seed in parts], device, workers)

    def probe_seeds(self, step_seed: int, n_probes: int, device: torch.device | str) -> list[tuple[int, int, int]]:
        """(index of the first probe, probe count, seed) of each generator of the step's probes, keyed by
        (step seed, target, generator, PROBE). On CPU one a probe: a generator costs little there and the
        draws are the work, so a forward of some slices draws only their probes, and threads draw a
        target's probes side by side. On accelerators one a block: each draw is a kernel."""
        rows, cols = self.probe_shape()
        per_generator = 1 if torch.device(device).type == "cpu" else probes_per_block(rows * cols)
        return [(first, min(per_generator, n_probes - first),
                 derive_seed(step_seed, self.index, first // per_generator, PROBE))
                for first in range(0, n_probes, per_generator)]

    def probe(self, step_seed: int, n_probes: int, i: int, device: torch.device) -> torch.Tensor:
        """Probe i of the step's N (the same numbers the forward and the update use)."""
        for first, block in self.probe_chunks(step_seed, n_probes, device, wanted=(i,)):
            if first <= i < first + len(block):
                return block[i - first]
        raise IndexError(f"probe {i} of {n_probes}")

    def probe_direction(self, coords: torch.Tensor) -> torch.Tensor:
        """The m×n weight-space direction of probe (or update) coordinates."""
        if self.side == "right":
            return self.left.to(coords.dtype) @ coords  # (P may be stored in half precision)
        if self.side == "left":
            return coords @ self.right
        return coords

    def window_weight(self) -> torch.Tensor:
        """The dense m×n update accumulated in the current window."""
        if self.side == "full":
            return self.dense.clone()
        if self.right is None:  # an adapter pair alone (fo-lora)
            return self.lora_B.new_zeros(self.out_features, self.in_features)
        return self.left.to(self.right.dtype) @ self.right

    def weight_delta(self) -> torch.Tensor:
        """The whole dense m×n delta: adapter plus current window (for export and tests)."""
        total = self.window_weight()
        if self.lora_B is not None:
            total = total + self.lora_B @ self.lora_A
        return total

    def fold(self, max_rank: int | None) -> float:
        """Move the window's L·R into the adapter, recompressing to rank ≤ max_rank.

        [B | L]·[A; R] is re-factored by QR of both sides and an SVD of the small core; the
        singular directions beyond max_rank are dropped. Returns the dropped fraction of the
        squared Frobenius norm (0 when nothing was truncated). Full-space deltas have no
        low-rank window and are not folded.
        """
        if self.side == "full":
            return 0.0
        window = self.right is not None  # (none: an adapter pair alone, as fo-lora trains)
        bs = ([] if self.lora_B is None else [self.lora_B]) + ([self.left.to(self.right.dtype)] if window else [])
        as_ = ([] if self.lora_A is None else [self.lora_A]) + ([self.right] if window else [])
        b, a = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        keep = int((s > s[0] * 1e-7).sum()) if s.numel() and s[0] > 0 else 0
        if max_rank is not None:
            keep = min(keep, max_rank)
        total = float((s**2).sum())
        dropped = float((s[keep:] ** 2).sum()) / total if total > 0 else 0.0
        root = s[:keep].sqrt()
        self.lora_B = (qb @ u[:, :keep]) * root
        self.lora_A = root[:, None] * (vh[:keep] @ qa.T)
        if window and self.side == "right":
            self.right = torch.zeros_like(self.right)
        elif window:
            self.left = torch.zeros_like(self.left)
        return dropped

    def forward_delta(self, x: torch.Tensor, out: torch.Tensor, probing: Probing | None) -> torch.Tensor:
        """out + delta(x), for an input whose leading rows are grouped slice-major when probing.

        `out` is the base Linear's fresh output; the delta is accumulated into it in place
        (one pass over it) unless autograd needs it or it is not contiguous.
        """
        dtype = out.dtype
        x = x.reshape(-1, x.shape[-1]).to(dtype)
        if out.requires_grad and self.right is None and self.dense is None and self.lora_A is not None:
            # fo-lora's backward: out of place, so no copy of `out` and no CopySlices node in the graph
            y = out.reshape(-1, out.shape[-1])
            return torch.addmm(y, x @ self.lora_A.to(dtype).T, self.lora_B.to(dtype).T).view(out.shape)
        if out.requires_grad or not out.is_contiguous():
            out = out.clone(memory_format=torch.contiguous_format)
        y = out.view(-1, out.shape[-1])
        if self.lora_A is not None and self.lora_A.shape[0] > 0:
            y.addmm_(x @ self.lora_A.to(dtype).T, self.lora_B.to(dtype).T)
        if self.right is None and self.dense is None:  # adapter only (inference with a loaded adapter)
            return out
        if self.side == "right":  # slice s: x_s (R + scale_s·u_s)ᵀ Lᵀ
            y.addmm_(_per_slice(x, self.right, probing, self), self.left.to(dtype).T)
        elif self.side == "left":  # slice s: (x_s Rᵀ)(L + scale_s·u_s)ᵀ
            _per_slice(x @ self.right.to(dtype).T, self.left, probing, self, acc=y)
        else:
            y.addmm_(x, self.dense.to(dtype).T)
            if probing is not None and probing.wanted:
                probing.add_probes(self, x, y)
        return out


def _per_slice(x: torch.Tensor, coords: torch.Tensor, probing: Probing | None, target: DeltaTarget,
               acc: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ (added into `acc` if given), W = coords unperturbed, or per slice s W_s = coords + scale_s·probe_s.

    While probing, the S slices' W_s (S copies of a low-rank factor, small) are formed in the input's
    dtype and applied by one batched matmul, so x is read once.
    """
    dtype = x.dtype
    if probing is None or not probing.wanted:  # (every slice unperturbed: nothing to draw)
        return x @ coords.to(dtype).T if acc is None else acc.addmm_(x, coords.to(dtype).T)
    w = probing.perturbed(coords, probing.blocks(target, coords.device), dtype).mT
    xs = x.view(len(probing.scales), -1, x.shape[-1])
    if acc is None:
        return torch.bmm(xs, w).view(x.shape[0], -1)
    return acc.view(len(probing.scales), -1, acc.shape[-1]).baddbmm_(xs, w).view(acc.shape)


def _blocks(targets: list[DeltaTarget]) -> list[list[int]]:
    """Target indices grouped by decoder block (BLOCK; a target outside any is a block of its own)."""
    blocks: dict[object, list[int]] = {}
    for t in targets:
        match = BLOCK.search(t.name)
        blocks.setdefault(t.name[: match.end()] if match else t.index, []).append(t.index)
    return list(blocks.values())


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None and param.device.type != "meta" else default


class DeltaModel:
    """A causal LM with a delta beside each target Linear (attached with forward hooks), and
    optionally beside their biases and the matching norms (`vectors`, edgezo/vector_delta.py)."""

    def __init__(self, model: nn.Module, targets: list[DeltaTarget], pattern: str = DEFAULT_TARGETS):
        self.model = model
        self.targets = targets
        self.pattern = pattern
        self.vectors: list[VectorDelta] = []
        self.probing: Probing | None = None
        self.shuttle: offload.Shuttle | None = None  # carries offloaded targets' factors (offload_state)
        self.blocks = _blocks(targets)  # the targets of each decoder block, in model order
        self._block_of = {i: b for b, members in enumerate(self.blocks) for i in members}
        self._handles: list = []
        self.reattach()

    @classmethod
    def attach(cls, model: nn.Module, pattern: str = DEFAULT_TARGETS) -> "DeltaModel":
        """Attach to every nn.Linear (quantized Linears included) whose name matches `pattern`."""
        regex = re.compile(pattern)
        found = [
            (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and regex.search(name)
        ]
        if not found:
            from edgezo.errors import EdgezoError

            raise EdgezoError(f"no Linear layer matches the target pattern {pattern!r}; pass a pattern that names some")
        # a streamed block waits on the meta device: its Linears compute where the resident parts live
        resident = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        targets = [
            DeltaTarget(i, name, mod, mod.out_features, mod.in_features, _device_of(mod, resident))
            for i, (name, mod) in enumerate(found)
        ]
        return cls(model, targets, pattern)

    def _hook(self, target: DeltaTarget):
        def hook(module, args, output):
            if not target.offloaded:
                return target.forward_delta(args[0], output, self.probing)
            block = self._block_of[target.index]
            factors = self.shuttle.fetch(("block", block), self.blocks[block], self._factors_of(block), keep=True)
            if block + 1 < len(self.blocks):  # the next block's copies overlap this block's kernels
                self.shuttle.fetch_ahead(("block", block + 1), self.blocks[block + 1], self._factors_of(block + 1))
            with target.holding({key: factors[target.index, key] for key in FACTORS}):
                return target.forward_delta(args[0], output, self.probing)

        return hook

    def _factors_of(self, block: int):
        """A function giving the block's host factors, keyed (target index, name): built only if copied."""
        return lambda: {(i, key): getattr(self.targets[i], key) for i in self.blocks[block] for key in FACTORS}

    def add_vectors(self, vectors: list[VectorDelta] | None = None) -> None:
        """Attach 1-D deltas: `vectors`, or zero ones for the targets' biases and the norms matching the pattern."""
        if vectors is None:
            vectors = vector_delta.find_vectors(self.model, self.pattern, [t.module for t in self.targets])
            if not vectors:
                from edgezo.errors import EdgezoError

                raise EdgezoError(f"train_1d: no bias or norm matches the target pattern {self.pattern!r}")
        self.vectors = vectors
        self._handles += [self._hook_vector(v) for v in vectors]

    def _hook_vector(self, v: VectorDelta):
        return v.module.register_forward_hook(
            lambda module, args, output: v.forward_delta(args[0], output, self.probing))

    @contextlib.contextmanager
    def probe(self, step_seed: int, n_probes: int, probes: list[int], scales: list[float]) -> Iterator[None]:
        """Within this context the model's batch is len(probes) slices, slice s perturbed by
        scales[s] · probe probes[s] of the step's n_probes (-1: unperturbed)."""
        self.probing = Probing(step_seed, n_probes, probes, scales)
        try:
            yield
        finally:
            self.probing = None

    def detach(self) -> nn.Module:
        """Remove the hooks; the model is then exactly the untouched base."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model

    def reattach(self) -> None:
        """Put the hooks (back) in place, e.g. after detach(): the deltas apply again."""
        self.detach()
        self._handles = [t.module.register_forward_hook(self._hook(t)) for t in self.targets]
        self._handles += [self._hook_vector(v) for v in self.vectors]

    def state_dict(self) -> dict[str, torch.Tensor]:
        offload.settle(t.device for t in self.targets if t.offloaded)
        out = {}
        for t in self.targets:
            for key in FACTORS:
                value = getattr(t, key)
                if value is not None:
                    out[f"{t.name}.{key}"] = value
        return out | vector_delta.state_dict(self.vectors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for t in self.targets:
            loaded = {key: state.get(f"{t.name}.{key}") for key in FACTORS}
            if t.offloaded:  # into the host tensors in place, where they keep their packing
                loaded = offload.write_back({key: getattr(t, key) for key in FACTORS}, loaded)
            for key, value in loaded.items():
                setattr(t, key, value if t.offloaded or value is None else value.clone())
        if self.shuttle is not None:  # (after the copies into the new host tensors are queued)
            self.shuttle.reset()
        vector_delta.load_state_dict(self.vectors, state)
