"""The four zeroth-order methods behind one interface, `make_optimizer(name, delta, ...)` -> ZOOptimizer,
and the budgeted first-order mode ("fo-lora", edgezo/optim/first_order.py) behind the same one."""

from __future__ import annotations

import dataclasses

from edgezo import checks
from edgezo.delta import DeltaModel
from edgezo.dtypes import FLOAT_DTYPES
from edgezo.errors import EdgezoError
from edgezo.optim.first_order import FirstOrder, FOConfig
from edgezo.optim.base import LossFn, Method, OptimizerState, StepResult, ZOConfig, ZOOptimizer
from edgezo.optim.lozo import LOZO
from edgezo.optim.mezo import MeZO
from edgezo.optim.zo_mopi import ZOMOPI, released
from edgezo.optim.zo_muon import ORTHOGONALIZERS, ZOMuon

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
# Accepted values of every method's and estimator's settings (make_optimizer's overrides, a TuneConfig's optim)
RANGES: dict[str, checks.Check] = {
    "lr": checks.either(checks.above(0), checks.literal("auto")), "eps": checks.above(0),
    "n_probes": checks.at_least(1), "rank": checks.at_least(1), "k": checks.at_least(1),
    "beta": checks.fraction(low_open=False), "interval": checks.at_least(0),
    "fuse": checks.optional(checks.at_least(1), "none (all slices in one forward)"),
    "adapter_rank": checks.optional(checks.at_least(1), "none (exact)"), "lr_1d": checks.above(0),
    "state_dtype": checks.one_of(FLOAT_DTYPES), "orthogonalizer": checks.one_of(ORTHOGONALIZERS),
    "alpha": checks.above(0), "betas": checks.pair_of(checks.fraction(low_open=False)),
    "weight_decay": checks.not_below(0),
    **{flag: checks.FLAG for flag in ("two_sided", "train_1d", "cuda_graph", "offload_state", "recompute",
                                       "anchored", "carry_v")},
}


def make_optimizer(name: str, delta: DeltaModel, seed: int = 0, variant: str = "paper", parallel=None,
                   **overrides) -> ZOOptimizer | FirstOrder:
    """A ZOOptimizer for `name` with its defaults, any field of the method or of ZOConfig overridden.

    `variant="released"` (ZO-MOPI only) selects the authors' released configuration, bugs fixed.
    `parallel` (edgezo.distributed.make_parallel) spreads each step's evaluations over a process group.
    """
    if name == FIRST_ORDER:
        return FirstOrder(delta, _first_order(overrides), seed=seed, parallel=parallel)
    method, config = _zeroth_order(name, variant, overrides)
    return ZOOptimizer(delta, method, config, seed=seed, parallel=parallel)


def check_settings(name: str, variant: str = "paper", **overrides) -> None:
    """Raise the EdgezoError make_optimizer would for these settings, without a model (TuneConfig.validate)."""
    _first_order(overrides) if name == FIRST_ORDER else _zeroth_order(name, variant, overrides)


def _zeroth_order(name: str, variant: str, overrides: dict) -> tuple[Method, ZOConfig]:
    key = f"{name}-released" if variant == "released" else name
    if key not in DEFAULTS:
        raise EdgezoError(f"unknown optimizer {name!r} (variant {variant!r}); choose one of {', '.join(OPTIMIZERS)}")
    method, config = DEFAULTS[key]
    method_fields = {f.name for f in dataclasses.fields(method)}
    config_fields = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - method_fields - config_fields
    if unknown:
        raise EdgezoError(f"unknown setting(s) {sorted(unknown)} for {name}; valid: {sorted(method_fields | config_fields)}")
    _check_values(name, overrides, getattr(method, "rank", None))
    method = dataclasses.replace(method, **{k: v for k, v in overrides.items() if k in method_fields})
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if k in config_fields})
    return method, config


def _first_order(overrides: dict) -> FOConfig:
    valid = {f.name for f in dataclasses.fields(FOConfig)} - {"name"}
    unknown = set(overrides) - valid
    if unknown:
        raise EdgezoError(f"unknown setting(s) {sorted(unknown)} for {FIRST_ORDER}; valid: {sorted(valid)}")
    _check_values(FIRST_ORDER, overrides, None)
    return dataclasses.replace(FOConfig(), **overrides)


def _check_values(name: str, overrides: dict, default_rank: int | None) -> None:
    checks.check(RANGES, overrides, f"{name}: ")
    rank = overrides.get("rank", default_rank)
    if "k" in overrides and rank is not None and overrides["k"] > rank:  # (a default k is clamped to the rank)
        raise EdgezoError(f"{name}: k must be an integer in [1, rank = {rank}], got {overrides['k']}")


__all__ = [
    "DEFAULTS", "FIRST_ORDER", "FOConfig", "FirstOrder", "OPTIMIZERS", "ZO_OPTIMIZERS", "LOZO", "LossFn", "MeZO", "OptimizerState", "StepResult", "ZOConfig",
    "ZOMOPI", "ZOMuon", "ZOOptimizer", "check_settings", "make_optimizer", "released",
]
