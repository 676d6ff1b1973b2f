"""The ZO update as one CUDA graph (ZOConfig.cuda_graph): ZOOptimizer.update_matrices captured, then replayed.

At batch 1 on a GPU the update is bound by the host, which issues thousands of small kernels one op call at
a time. A replayed graph issues them all at once. Each target's probe blocks come from generators
registered with the graph and re-seeded before each replay with the seeds an eager draw uses
(DeltaTarget.probe_seeds), so the probes equal the forward's (bench/cuda_graph_rng.py checks this
bitwise). g_i and the step's learning rate (ZOOptimizer.lr_at) are read from device tensors refilled before each replay; the method's
other settings are fixed at capture. The graph writes into the tensors that were live at capture. A
refresh, a fold or a loaded checkpoint replaces them, so the first step on new tensors runs eagerly (which
also warms up cuBLAS and cuSOLVER) and the next one captures again. The graph's memory pool keeps the
update's transients (the stacked Ĝ and state of every chunk) allocated between steps. Implemented and
tested (tests/test_graphed.py, on a GPU) for ZO-MOPI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from edgezo.delta import DeltaTarget
from edgezo.errors import EdgezoError


class Updater(Protocol):
    """What the graph needs of the optimizer whose update it replays: edgezo.optim.base.ZOOptimizer, which
    builds a GraphedUpdate, so it is described here rather than imported (base imports graphed, not back)."""

    method: Any  # .name
    state: Any  # .per_target: each target's state tensors
    config: Any  # .lr

    @property
    def targets(self) -> list[DeltaTarget]: ...

    def update_matrices(self, chunks: list[list[int]], scaled: torch.Tensor,
                        blocks_of: Callable[[int], Iterable[tuple[int, torch.Tensor]]],
                        lr: float | torch.Tensor) -> None: ...

    def _update_chunks(self) -> list[list[int]]: ...


class GraphedUpdate:
    """ZOOptimizer.apply_update's replacement for the matrix targets: replay() runs the step's update."""

    def __init__(self, opt: Updater):
        devices = {t.device.type for t in opt.targets}
        if devices != {"cuda"} or opt.method.name != "zo-mopi":
            raise EdgezoError("cuda_graph needs every trained Linear on a CUDA device and the zo-mopi optimizer "
                              f"(got devices {sorted(devices)}, {opt.method.name}); turn cuda_graph off")
        self.opt = opt
        self.graph: torch.cuda.CUDAGraph | None = None
        self.generators: dict[tuple[int, int], torch.Generator] = {}  # (target index, block) -> registered
        self.g: torch.Tensor | None = None  # the replay's g_i / N
        self.lr: torch.Tensor | None = None
        self.captured_on: tuple | None = None  # data pointers of the tensors the graph writes
        self.warmed_on: tuple | None = None

    def replay(self, scaled: torch.Tensor, step_seed: int, lr: float) -> bool:
        """Run this step's update (at rate `lr`, the schedule's) by replaying the graph; False where the
        caller must run it eagerly."""
        written = self._written()
        if written != self.captured_on:
            if written != self.warmed_on:  # first step on these tensors: eager
                self.warmed_on = written
                return False
            self._capture(len(scaled))
            self.captured_on = written
        for target in self.opt.targets:
            for block, (_, _, seed) in enumerate(target.probe_seeds(step_seed, len(scaled), target.device)):
                self.generators[(target.index, block)].manual_seed(seed)
        self.g.copy_(scaled)
        self.lr.fill_(lr)
        with torch.cuda.device(self.g.device):
            self.graph.replay()
        return True

    def _written(self) -> tuple:
        opt = self.opt
        return tuple(x.data_ptr() for target, st in zip(opt.targets, opt.state.per_target)
                     for x in (target.coords(), *st.values()))

    def _capture(self, n_probes: int) -> None:
        opt, device = self.opt, self.opt.targets[0].device
        self.graph, self.g = torch.cuda.CUDAGraph(), torch.zeros(n_probes, device=device)
        self.lr = torch.zeros((), device=device)
        self.generators = {}
        for target in opt.targets:
            for block in range(len(target.probe_seeds(0, n_probes, device))):
                self.generators[(target.index, block)] = gen = torch.Generator(device=device)
                self.graph.register_generator_state(gen)

        def blocks_of(index: int) -> list[tuple[int, torch.Tensor]]:
            target = opt.targets[index]
            return [(first, torch.randn((count, *target.probe_shape()), generator=self.generators[(index, block)],
                                        device=device, dtype=torch.float32))
                    for block, (first, count, _) in enumerate(target.probe_seeds(0, n_probes, device))]

        with torch.cuda.device(device), torch.cuda.graph(self.graph):
            opt.update_matrices(opt._update_chunks(), self.g, blocks_of, self.lr)
