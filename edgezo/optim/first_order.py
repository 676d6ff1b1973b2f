"""First-order LoRA, budgeted: exact gradients through the delta path with block-wise recomputation.

Where the planner finds room (edgezo/plan.py, optimizer "fo-lora"), backprop is the fastest way to a
good adapter: on the tweet task it reaches in ~100 forward-equivalents what zeroth-order methods do not
reach in 2,000 (docs/convergence.md). Its memory is kept near inference the way Apple's MeBP does it:

    per target W:  ΔW = s·B·A   (A: R×n, kaiming-uniform; B: m×R, zero; s = alpha/R, PEFT's LoRA)
    forward:       every decoder block under activation checkpointing: only the block inputs are kept,
                   each block's activations are recomputed during its backward (one block at a time);
                   the LM head runs on the scored positions only (edgezo.data's loss)
    update:        Adam on (A, B), whose moments are the only state besides the factors

The base stays read-only: the factors are the delta path's adapter pair (DeltaTarget.lora_B/lora_A),
so export, merge and inference are those of any run. A step counts as 4 forwards (forward, recompute,
backward ≈ 2 forwards of arithmetic), 3 without recomputation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.optim.base import LossFn, OptimizerState, StepResult
from edgezo.runtime.recompute import recomputed_blocks
from edgezo.zo.probes import derive_seed


@dataclass
class FOConfig:
    lr: float = 1e-3
    rank: int = 8  # R of each LoRA pair
    alpha: float = 16.0  # PEFT's lora_alpha: ΔW = (alpha / R)·B·A
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    recompute: bool = True  # activation checkpointing per decoder block (off: plain backprop's memory)
    adapter_rank: int | None = None  # export cap; None keeps the rank-R pair exact
    name: str = "fo-lora"

    @property
    def forwards_per_step(self) -> int:
        return 4 if self.recompute else 3


class FirstOrder:
    """Adam on the LoRA pairs of a DeltaModel, with the ZOOptimizer's interface for the tune loop."""

    def __init__(self, delta: DeltaModel, config: FOConfig, seed: int = 0, parallel=None):
        if parallel is not None:
            raise EdgezoError("fo-lora runs in one process (its gradients are tensors, not scalars); "
                              "drop --distributed or use a zeroth-order optimizer")
        if delta.vectors:
            raise EdgezoError("fo-lora trains the Linears' LoRA pairs only; turn train_1d off")
        if delta.shuttle is not None or any(t.module.weight.device.type == "meta" for t in delta.targets):
            raise EdgezoError("fo-lora needs the whole model resident (no streaming, no offload_state); "
                              "turn those off or use a zeroth-order optimizer")
        if config.rank < 1 or config.lr <= 0:
            raise EdgezoError(f"fo-lora: rank {config.rank} and lr {config.lr:g} must be positive")
        self.delta, self.config, self.parallel = delta, config, None
        for p in delta.model.parameters():  # the base is read only: no gradient of it is ever computed
            p.requires_grad_(False)
        self.state = OptimizerState(step=0, seed=seed, per_target=[{} for _ in delta.targets])
        self.scale = config.alpha / config.rank
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (A, B) of each target, the leaves Adam steps
        for target in delta.targets:
            r = min(config.rank, target.out_features, target.in_features)
            g = torch.Generator().manual_seed(derive_seed(seed, -1, target.index))
            bound = 1 / math.sqrt(target.in_features)  # PEFT's kaiming_uniform_(a=√5)
            a = (torch.rand(r, target.in_features, generator=g) * 2 - 1).mul_(bound).to(target.device)
            b = torch.zeros(target.out_features, r, device=target.device)
            self.factors.append((a.requires_grad_(), b.requires_grad_()))
        self.adam = torch.optim.Adam([p for pair in self.factors for p in pair], lr=config.lr,
                                     betas=config.betas, weight_decay=config.weight_decay)
        self._publish(detached=True)

    @property
    def targets(self):
        return self.delta.targets

    def _publish(self, detached: bool) -> None:
        """The delta path's adapter pair of each target: (s·B, A), in the autograd graph or not."""
        for target, (a, b) in zip(self.targets, self.factors):
            target.lora_A = a.detach() if detached else a
            target.lora_B = (b * self.scale).detach() if detached else b * self.scale

    def step(self, loss_fn: LossFn, batch: dict) -> StepResult:
        self._publish(detached=False)
        try:
            with torch.enable_grad(), (recomputed_blocks(self.delta.model) if self.config.recompute
                                       else contextlib.nullcontext()):
                loss = loss_fn(self.delta.model, batch, 1)[0]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {self.state.step}: {float(loss)}")
                loss.backward()
        finally:
            self._publish(detached=True)  # (a failed step leaves no graph behind)
        grads = [p.grad for pair in self.factors for p in pair]
        if not all(torch.isfinite(g).all() for g in grads):
            self.adam.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient at step {self.state.step}")
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self._publish(detached=True)
        self.state.step += 1
        return StepResult(float(loss.detach()), self.config.forwards_per_step, [])

    def skip_step(self) -> None:
        self.state.step += 1

    # -- explicit state: the raw factors and Adam's moments, by target --------------------------
    def state_dict(self) -> dict:
        tensors = {}
        for target, pair in zip(self.targets, self.factors):
            for name, p in zip("AB", pair):
                tensors[f"{target.name}.{name}"] = p.detach().clone()  # (A is the published lora_A too)
                for key, value in self.adam.state.get(p, {}).items():
                    tensors[f"{target.name}.{name}.{key}"] = value
        return {"step": self.state.step, "seed": self.state.seed, "tensors": tensors}

    def load_state_dict(self, sd: dict) -> None:
        self.state.step, self.state.seed = int(sd["step"]), int(sd["seed"])
        tensors = sd["tensors"]
        for target, pair in zip(self.targets, self.factors):
            for name, p in zip("AB", pair):
                prefix = f"{target.name}.{name}"
                with torch.no_grad():
                    p.copy_(tensors[prefix])
                moments = {k[len(prefix) + 1:]: v.clone() for k, v in tensors.items() if k.startswith(prefix + ".")}
                if moments:
                    moments["step"] = moments["step"].cpu()  # Adam keeps its step count on the CPU
                    self.adam.state[p] = moments
                else:
                    self.adam.state.pop(p, None)
        self._publish(detached=True)
