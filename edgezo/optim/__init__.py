"""The four zeroth-order methods behind one interface, `make_optimizer(name, delta, ...)` -> ZOOptimizer,
and the budgeted first-order mode ("fo-lora", edgezo/optim/first_order.py) behind the same one."""

from __future__ import annotations

import dataclasses

from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.optim.first_order import FirstOrder, FOConfig
from edgezo.optim.base import LossFn, Method, OptimizerState, StepResult, ZOConfig, ZOOptimizer
from edgezo.optim.lozo import LOZO
from edgezo.optim.mezo import MeZO
from edgezo.optim.zo_mopi import ZOMOPI, released
from edgezo.optim.zo_muon import ZOMuon

# Defaults per method: (method policy, estimator/schedule settings). Learning rates and ZO-MOPI's probe count
# come from the SmolLM2 tweet-sentiment runs (docs/convergence.md); the reasoning is in docs/defaults.md.
DEFAULTS: dict[str, tuple[Method, ZOConfig]] = {
    "zo-mopi": (ZOMOPI(), ZOConfig(lr=3e-2, n_probes=4, two_sided=False)),
    "zo-mopi-released": (released(), ZOConfig(lr=9e-2, n_probes=8, two_sided=False)),
    "zo-muon": (ZOMuon(), ZOConfig(lr=9e-2, n_probes=4, two_sided=False)),
    "lozo": (LOZO(), ZOConfig(lr=9e-5, n_probes=1, two_sided=True)),
    "mezo": (MeZO(), ZOConfig(lr=3e-5, n_probes=1, two_sided=True)),
}
ZO_OPTIMIZERS = ("zo-mopi", "zo-muon", "lozo", "mezo")
FIRST_ORDER = "fo-lora"
OPTIMIZERS = (*ZO_OPTIMIZERS, FIRST_ORDER)


def make_optimizer(name: str, delta: DeltaModel, seed: int = 0, variant: str = "paper", parallel=None,
                   **overrides) -> ZOOptimizer | FirstOrder:
    """A ZOOptimizer for `name` with its defaults, any field of the method or of ZOConfig overridden.

    `variant="released"` (ZO-MOPI only) selects the authors' released configuration, bugs fixed.
    `parallel` (edgezo.distributed.make_parallel) spreads each step's evaluations over a process group.
    """
    if name == FIRST_ORDER:
        return FirstOrder(delta, _first_order(overrides), seed=seed, parallel=parallel)
    key = f"{name}-released" if variant == "released" else name
    if key not in DEFAULTS:
        raise EdgezoError(f"unknown optimizer {name!r} (variant {variant!r}); choose one of {', '.join(OPTIMIZERS)}")
    method, config = DEFAULTS[key]
    method_fields = {f.name for f in dataclasses.fields(method)}
    config_fields = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - method_fields - config_fields
    if unknown:
        raise EdgezoError(f"unknown setting(s) {sorted(unknown)} for {name}; valid: {sorted(method_fields | config_fields)}")
    method = dataclasses.replace(method, **{k: v for k, v in overrides.items() if k in method_fields})
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in config_fields})
    return ZOOptimizer(delta, method, config, seed=seed, parallel=parallel)


def _first_order(overrides: dict) -> FOConfig:
    valid = {f.name for f in dataclasses.fields(FOConfig)} - {"name"}
    unknown = set(overrides) - valid
    if unknown:
        raise EdgezoError(f"unknown setting(s) {sorted(unknown)} for {FIRST_ORDER}; valid: {sorted(valid)}")
    return dataclasses.replace(FOConfig(), **overrides)


__all__ = [
    "DEFAULTS", "FIRST_ORDER", "FOConfig", "FirstOrder", "OPTIMIZERS", "ZO_OPTIMIZERS", "LOZO", "LossFn", "MeZO", "OptimizerState", "StepResult", "ZOConfig",
    "ZOMOPI", "ZOMuon", "ZOOptimizer", "make_optimizer", "released",
]
