"""The one zeroth-order step shared by every method; a method is a small policy object.

    step t:  refresh the window if t % ν == 0            (method.refresh: new basis, fold, reproject)
             evaluate the slices (fused or separately)   f(θ ± ε·z_i), or f(θ) and f(θ + ε·z_i)
             g_i  = finite difference per probe          (edgezo.zo.estimators)
             Ĝ    = (1/N) Σ_i g_i · u_i per target        (u_i regenerated from its seed)
             update from Ĝ                               (method.update: SGD, NS5, power iteration…),
                                                         batched over the targets of one shape
             train_1d: biases and norms step by ZO-SGD  (edgezo/vector_delta.py, same g_i)

Only seeds and the N scalars g_i are needed to reproduce a step, which is what the distributed
mode sends. All state is in `OptimizerState` (tensors + two integers) and the DeltaModel.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol

import torch

from edgezo import offload
from edgezo.delta import FACTORS, DeltaModel, DeltaTarget
from edgezo.errors import EdgezoError
from edgezo.optim import schedule
from edgezo.optim.graphed import GraphedUpdate
from edgezo.zo import estimators
from edgezo.zo.probes import derive_seed, draw_workers

if TYPE_CHECKING:
    from edgezo.distributed import Replicas

LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]

# Ĝ and method state of the targets updated in one batch, at most, counted in fp32 (the update's
# working precision, whatever the state is stored in): bounds the update's transient memory (the
# stacked copies and the update's temporaries, about twice this) whatever the model's size. A GPU
# wants large batches, as each op is a kernel launch; a CPU runs as fast in small ones.
UPDATE_CHUNK_BYTES = 16 << 20
UPDATE_CHUNK_BYTES_CUDA = 64 << 20
COORDS = "coords"  # offload_state: the targets' coordinates, among the method state's names in a packed chunk


def update_chunk_bytes(device: torch.device) -> int:
    return UPDATE_CHUNK_BYTES_CUDA if device.type == "cuda" else UPDATE_CHUNK_BYTES


@dataclass
class StepResult:
    loss: float
    forwards: int
    scalars: list[float]
    refreshed: bool = False
    dropped_energy: float = 0.0


@dataclass
class OptimizerState:
    step: int = 0
    seed: int = 0
    per_target: list[dict[str, torch.Tensor]] = field(default_factory=list)  # method state, by target


class Method(Protocol):
    """What differs between MeZO, LOZO, ZO-Muon and ZO-MOPI."""

    name: str
    side: str  # probe geometry of the targets: "right" (P·u), "left" (u·vᵀ) or "full"
    interval: int  # window length ν; 0 = never refresh

    def init(self, target: DeltaTarget, state: dict[str, torch.Tensor], seed: int) -> None: ...

    def refresh(self, target: DeltaTarget, state: dict[str, torch.Tensor], seed: int) -> None: ...

    def update(self, state: dict[str, torch.Tensor], grad: torch.Tensor, lr: float | torch.Tensor) -> torch.Tensor:
        """The step of B targets of one shape: `grad` (B, *probe_shape) and every `state` tensor are
        stacked on dim 0 (`lr`: a float, or a 0-dim device tensor under cuda_graph); updates `state` (in
        place or by replacing entries) and returns the (B, *probe_shape) step that is subtracted from each
        target's coordinates. `grad` is the caller's scratch: the step may be computed in it."""
        ...


@dataclass
class ZOConfig:
    """Estimator and schedule settings common to all methods."""

    lr: float = 1e-2
    eps: float = 1e-3
    n_probes: int = 4
    two_sided: bool = False
    adapter_rank: int | None = None  # cap on the folded adapter's rank; None keeps it exact
    fuse: int | None = None  # slices per forward; None = all of a step's slices in one forward
    train_1d: bool = False  # also train biases and norms (vector_delta.py); off, they stay frozen
    lr_1d: float = 1e-5  # their plain ZO-SGD step: MeZO's full-space lr range (docs/defaults.md), not the released 1e-7
    cuda_graph: bool = False  # zo-mopi: replay the update as one CUDA graph (edgezo/optim/graphed.py)
    offload_state: bool = False  # keep factors and method state in host memory beside a GPU (edgezo/offload.py)
    schedule: str = "constant"  # lr over the run: constant | cosine | linear (edgezo/optim/schedule.py)
    warmup: int = 0  # steps of linear warmup before it
    horizon: int = 0  # steps the decay spans (tune sets it to the run's steps); unused by constant


class ZOOptimizer:
    """Drive one Method over a DeltaModel with forward passes only."""

    def __init__(self, delta: DeltaModel, method: Method, config: ZOConfig, seed: int = 0,
                 parallel: Replicas | None = None):
        self.delta, self.method, self.config = delta, method, config
        self.parallel = parallel  # edgezo.distributed: spreads evaluate() over the ranks of a process group
        self.state = OptimizerState(step=0, seed=seed, per_target=[{} for _ in delta.targets])
        schedule.check(config.schedule, config.warmup, config.horizon)
        if config.train_1d and not delta.vectors:
            delta.add_vectors()
        elif delta.vectors and not config.train_1d:  # they would be probed or applied but never trained
            raise EdgezoError("this DeltaModel carries 1-D deltas; train it with train_1d=True")
        if config.offload_state and config.cuda_graph:
            raise EdgezoError("cuda_graph and offload_state don't combine (a graph replays the same device "
                              "tensors; offloaded state comes to the device anew each step): turn one off")
        for target, st in zip(delta.targets, self.state.per_target):
            target.side = method.side
            method.init(target, st, derive_seed(seed, -1, target.index))
            if config.offload_state:  # one target's state at a time on the device
                target.offloaded = True
                _place([target], [st], {key: None if value is None else value.cpu()
                                        for key, value in _held([target], [st], FACTORS).items()})
        # offload_state: each update chunk's coordinates and method state, stacked (B, ...) views of the
        # pinned buffer they lie in (_pack), by the chunk's target indices
        self.packed: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        if config.offload_state:
            delta.shuttle = offload.Shuttle(delta.targets[0].device)
            self._pack()
        self.graphed = GraphedUpdate(self) if config.cuda_graph else None

    @property
    def targets(self) -> list[DeltaTarget]:
        return self.delta.targets

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step`: the base rate times the schedule's factor (no state)."""
        cfg = self.config
        return cfg.lr * schedule.factor(step, cfg.schedule, cfg.warmup, cfg.horizon)

    def step_seed(self, step: int) -> int:
        """The key of all of a step's probes (DeltaTarget.probe_chunks derives each target's draws)."""
        return derive_seed(self.state.seed, step)

    @torch.no_grad()
    def step(self, loss_fn: LossFn, batch: dict) -> StepResult:
        cfg, t = self.config, self.state.step
        refreshed, dropped = self._maybe_refresh(t)
        plan = estimators.slices(cfg.n_probes, cfg.two_sided)
        losses = self.evaluate(loss_fn, batch, plan, t)
        if not torch.isfinite(losses).all():
            raise FloatingPointError(f"non-finite loss at step {t}: {losses.tolist()}")
        g, loss = estimators.probe_scalars(losses, cfg.n_probes, cfg.two_sided, cfg.eps)
        self.apply_update(g, t)
        return StepResult(loss, len(plan), g.tolist(), refreshed, dropped)

    def skip_step(self) -> None:
        """Advance past a step whose losses were unusable; its probes are simply never applied."""
        self.state.step += 1

    def _maybe_refresh(self, t: int) -> tuple[bool, float]:
        nu = self.method.interval
        if t == 0 or nu <= 0 or t % nu != 0:
            return False, 0.0
        dropped = 0.0
        for chunk in self._update_chunks():  # (offloaded: a chunk's tensors come and go in a few copies)
            targets, states = self._members(chunk)
            with _resident(targets, states, self.delta.shuttle, FACTORS):
                for target, st in zip(targets, states):
                    dropped = max(dropped, target.fold(self.config.adapter_rank))
                    self.method.refresh(target, st, derive_seed(self.state.seed, t, -2, target.index))
        if self.config.offload_state:  # the folds made new adapter tensors (the rest was written in place)
            self._pack_blocks()
        return True, dropped

    def evaluate(self, loss_fn: LossFn, batch: dict, plan: list[estimators.Slice], t: int) -> torch.Tensor:
        """The loss of every slice, in this process or shared out over the ranks of `self.parallel`."""
        def local(part: list[estimators.Slice], rows: dict) -> torch.Tensor:
            return self._evaluate_here(loss_fn, rows, part, t)

        return local(plan, batch) if self.parallel is None else self.parallel.losses(plan, batch, local)

    def _evaluate_here(self, loss_fn: LossFn, batch: dict, plan: list[estimators.Slice], t: int) -> torch.Tensor:
        """The loss of every slice; `config.fuse` slices share one forward (batch stacked slice-major)."""
        chunk = self.config.fuse or len(plan)
        out = []
        with torch.no_grad():  # not inference_mode: quanto int4 kernels bump version counters
            for start in range(0, len(plan), chunk):
                part = plan[start : start + chunk]
                probes = [s.probe for s in part]
                scales = [0.0 if s.probe < 0 else s.sign * self.config.eps for s in part]
                stacked = {k: v.repeat(len(part), *[1] * (v.dim() - 1)) for k, v in batch.items()}
                with self.delta.probe(self.step_seed(t), self.config.n_probes, probes, scales):
                    out.append(loss_fn(self.delta.model, stacked, len(part)).double().cpu())
        return torch.cat(out)

    def apply_update(self, g: torch.Tensor, t: int) -> None:
        """Ĝ = (1/N) Σ g_i u_i per target, from regenerated probes; then the method's update, one call
        for each chunk of same-shape targets (_update_chunks). Advances the step."""
        # g_i/N on the targets' device once (a blocking copy per chunk would wait for the GPU each time)
        step_seed, scaled = self.step_seed(t), (g.float() / len(g)).to(self.targets[0].device, non_blocking=True)
        lr, lr_1d = self.lr_at(t), self.config.lr_1d * schedule.factor(t, self.config.schedule, self.config.warmup,
                                                                       self.config.horizon)
        if self.graphed is None or not self.graphed.replay(scaled, step_seed, lr):
            blocks_of = functools.partial(self._probe_blocks, step_seed, len(g))
            self.update_matrices(self._update_chunks(), scaled, blocks_of, lr)
        for vector in self.delta.vectors:  # the same g_i, against each 1-D parameter's own probes
            vector.update(g, step_seed, lr_1d)
        self.state.step = t + 1

    def _probe_blocks(self, step_seed: int, n_probes: int, index: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Target `index`'s probe blocks of the step, the numbers the forward drew (DeltaTarget.probe_chunks)."""
        device = self.targets[index].device
        return self.targets[index].probe_chunks(step_seed, n_probes, device, workers=draw_workers(device))

    def update_matrices(self, chunks: list[list[int]], scaled: torch.Tensor,
                        blocks_of: Callable[[int], Iterable[tuple[int, torch.Tensor]]],
                        lr: float | torch.Tensor) -> None:
        """The matrix targets' update from g_i/N (`scaled`) and their probe blocks: Ĝ, then one
        method.update per chunk of same-shape targets. No host sync: a CUDA graph can capture it
        (with `scaled` and `lr` as device tensors it refills before each replay)."""
        for j, chunk in enumerate(chunks):
            targets, states = self._members(chunk)
            if j + 1 < len(chunks):  # offloaded: the next chunk's copies overlap this chunk's kernels
                self._fetch_ahead(chunks[j + 1])
            if tuple(chunk) in self.packed:
                self._update_packed(chunk, targets, scaled, blocks_of, lr)
                continue
            with _resident(targets, states, self.delta.shuttle):
                grad = _estimates(targets, scaled, blocks_of)
                stacked = {key: torch.stack([st[key] for st in states]) for key in states[0]}
                step = self.method.update(stacked, grad, lr)
                torch._foreach_sub_([target.coords() for target in targets], step.unbind())
                for key, value in stacked.items():  # the state stays per target (state_dict, checkpoints)
                    torch._foreach_copy_([st[key] for st in states], value.unbind())

    def _update_packed(self, chunk: list[int], targets: list[DeltaTarget], scaled: torch.Tensor,
                       blocks_of: Callable[[int], Iterable[tuple[int, torch.Tensor]]],
                       lr: float | torch.Tensor) -> None:
        """update_matrices for an offloaded chunk: its packed buffer comes to the device in one copy,
        where its stacked views are the method's state, and goes back in one copy."""
        host = self.packed[tuple(chunk)]
        carried = self.delta.shuttle.fetch(("chunk", tuple(chunk)), chunk, host)
        state = {key: value for key, value in carried.items() if key != COORDS}
        step = self.method.update(state, _estimates(targets, scaled, blocks_of), lr)
        carried[COORDS].sub_(step)
        for key, value in state.items():
            if value is not carried[key]:  # (an entry the method replaced)
                carried[key].copy_(value)
        self.delta.shuttle.store(chunk, host, carried)

    def _fetch_ahead(self, chunk: list[int]) -> None:
        """Start the copies the update of this (offloaded) chunk will take."""
        if self.targets[chunk[0]].offloaded:
            if tuple(chunk) in self.packed:
                self.delta.shuttle.fetch_ahead(("chunk", tuple(chunk)), chunk, self.packed[tuple(chunk)])
            else:
                targets, states = self._members(chunk)
                self.delta.shuttle.fetch_ahead(_key(targets, None), chunk, _held(targets, states, None))

    def _pack(self) -> None:
        """offload_state: lay the host tensors out so that what moves together moves in one copy. Each
        update chunk's coordinates and method state, name by name, share one pinned buffer (self.packed:
        their stacked views); so do a decoder block's other factors (_pack_blocks)."""
        offload.settle([self.targets[0].device])  # (copies into the old buffers must have landed)
        self.packed = {}
        for chunk in self._update_chunks():
            targets, states = self._members(chunk)
            columns = {COORDS: [t.coords() for t in targets]} | {key: [st[key] for st in states] for key in states[0]}
            packed = iter(offload.pack([value for column in columns.values() for value in column]))
            columns = {key: [next(packed) for _ in column] for key, column in columns.items()}
            for target, value in zip(targets, columns.pop(COORDS)):
                setattr(target, target.coords_key, value)
            for key, column in columns.items():
                for st, value in zip(states, column):
                    st[key] = value
            views = {COORDS: offload.stacked([t.coords() for t in targets])}
            views |= {key: offload.stacked(column) for key, column in columns.items()}
            if all(view is not None for view in views.values()):  # (else its tensors move one by one)
                self.packed[tuple(chunk)] = views
        self._pack_blocks()

    def _pack_blocks(self) -> None:
        """Each decoder block's factors other than the coordinates (basis, adapter) in one pinned buffer:
        the forward carries them with the block's coordinates (DeltaModel)."""
        offload.settle([self.targets[0].device])
        for block in self.delta.blocks:
            held = [(self.targets[i], key) for i in block for key in FACTORS
                    if key != self.targets[i].coords_key and getattr(self.targets[i], key) is not None]
            for (target, key), value in zip(held, offload.pack([getattr(t, key) for t, key in held])):
                setattr(target, key, value)
        self.delta.shuttle.reset()

    def _members(self, chunk: list[int]) -> tuple[list[DeltaTarget], list[dict[str, torch.Tensor]]]:
        """The targets of a chunk (indices) and their method state."""
        return [self.targets[i] for i in chunk], [self.state.per_target[i] for i in chunk]

    def _update_chunks(self) -> list[list[int]]:
        """Indices of the targets updated together: same probe shape, device and state shapes, in
        chunks of at most update_chunk_bytes(device) of stacked Ĝ and state (at least one target)."""
        groups: dict[tuple, list[int]] = {}
        for i, (target, st) in enumerate(zip(self.targets, self.state.per_target)):
            layout = tuple((key, value.shape, value.dtype) for key, value in st.items())
            groups.setdefault((target.probe_shape(), target.device, layout), []).append(i)
        chunks = []
        for (shape, device, _), members in groups.items():
            st = self.state.per_target[members[0]]
            per_target = 4 * (math.prod(shape) + sum(v.numel() for v in st.values()))
            size = max(1, update_chunk_bytes(device) // per_target)
            chunks += [members[i : i + size] for i in range(0, len(members), size)]
        return chunks

    # -- explicit state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        offload.settle(t.device for t in self.targets if t.offloaded)
        tensors = {f"{t.name}.{k}": v for t, st in zip(self.targets, self.state.per_target) for k, v in st.items()}
        return {"step": self.state.step, "seed": self.state.seed, "tensors": tensors}

    def load_state_dict(self, sd: dict) -> None:
        self.state.step, self.state.seed = int(sd["step"]), int(sd["seed"])
        for target, st in zip(self.targets, self.state.per_target):
            prefix = target.name + "."
            own = {k[len(prefix) :]: v for k, v in sd["tensors"].items() if k.startswith(prefix)}
            held = dict(st)
            st.clear()  # offloaded: loaded into the host tensors in place, where they keep their packing
            st.update(offload.write_back(held, own) if target.offloaded else {k: v.clone() for k, v in own.items()})
        if self.config.offload_state:  # (packed anew, for any tensor the load had to replace)
            self._pack()


@contextlib.contextmanager
def _resident(targets: list[DeltaTarget], states: list[dict[str, torch.Tensor]], shuttle: offload.Shuttle | None,
              factors: tuple[str, ...] | None = None) -> Iterator[None]:
    """Within: these targets' method state and factors (default: their coordinates, all the update
    touches) on their device, written back to the host on leaving, if they are offloaded (offload_state;
    otherwise there is nothing to do). One fetch and one store for them all."""
    if not targets[0].offloaded:
        yield
        return
    host = _held(targets, states, factors)  # (an update chunk packed as usual takes _update_packed instead)
    _place(targets, states, shuttle.fetch(_key(targets, factors), [t.index for t in targets], host))
    try:
        yield
    finally:
        _place(targets, states, shuttle.store([t.index for t in targets], host, _held(targets, states, factors)))


def _key(targets: list[DeltaTarget], factors: tuple[str, ...] | None) -> tuple:
    return tuple(t.index for t in targets), factors


def _held(targets: list[DeltaTarget], states: list[dict[str, torch.Tensor]],
          factors: tuple[str, ...] | None) -> dict[tuple[int, str, str], torch.Tensor | None]:
    """The tensors _resident moves, keyed by (target position, "factor" | "state", name)."""
    out = {}
    for i, (target, st) in enumerate(zip(targets, states)):
        out.update({(i, "factor", key): getattr(target, key) for key in factors or (target.coords_key,)})
        out.update({(i, "state", key): value for key, value in st.items()})
    return out


def _place(targets: list[DeltaTarget], states: list[dict[str, torch.Tensor]], tensors: dict) -> None:
    for (i, kind, key), value in tensors.items():
        if kind == "factor":
            setattr(targets[i], key, value)
        else:
            states[i][key] = value


def _estimates(targets: list[DeltaTarget], g: torch.Tensor,
               blocks_of: Callable[[int], Iterable[tuple[int, torch.Tensor]]]) -> torch.Tensor:
    """Ĝ of same-shape targets, stacked: row b = Σ_i g_i u_i over target b's regenerated probes (g holds g_i/N);
    blocks_of(target index) gives a target's probe blocks (DeltaTarget.probe_chunks, as in the forward)."""
    device = targets[0].device
    g = g.to(device)
    grad = torch.zeros(len(targets), *targets[0].probe_shape(), device=device)
    for row, target in zip(grad.flatten(1), targets):
        for first, block in blocks_of(target.index):
            row.addmv_(block.flatten(1).mT, g[first : first + len(block)])
    return grad
