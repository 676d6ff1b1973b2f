"""Device profiles: what a device lets edgezo use, resolved into Settings that fit its memory.

A profile is a TOML file (shipped ones live in profiles/, installed as `edgezo.device_profiles`);
its keys are documented at the top of every shipped file and in `KEYS` below.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from edgezo import checks
from edgezo.errors import EdgezoError
from edgezo.optim import RANGES as OPTIM_RANGES
from edgezo.plan import (FIRST_ORDER, first_order_can_run, FLOAT_BYTES, LOSSES, OPTIMIZERS, PRIORITY, QUANT_BYTES, RUNTIME_BYTES, GiB, MemoryPlan, Settings,
                         anatomy, candidate_size, largest_fitting, load_config, plan)

DEVICES = tuple(RUNTIME_BYTES)
FLOAT_PRECISIONS = tuple(FLOAT_BYTES)
QUANTIZATIONS = ("none",) + tuple(QUANT_BYTES)
# key: (type, allowed values or None); the first five are required
KEYS = {
    "name": (str, None), "device": (str, DEVICES), "memory_budget_gb": (float, None),
    "time_budget_min": (float, None), "throughput_gflops": (float, None),
    "description": (str, None), "precision": (str, FLOAT_PRECISIONS), "quantization": (str, QUANTIZATIONS),
    "optimizer": (str, ("auto",) + OPTIMIZERS), "runtime_gb": (float, None), "min_steps": (int, None),
    "search": (dict, None), "fixed": (dict, None),
}
REQUIRED = tuple(KEYS)[:5]
TOKEN_KEYS = ("seq_len", "batch_size", "n_probes")  # the settings that set a step's work
FIXED_KEYS = {f.name: type(f.default) for f in dataclasses.fields(Settings)} | {"fuse": int, "scored_tokens": int}
for _k in ("optimizer", "precision", "device"):  # profile-level keys, not fixed settings
    FIXED_KEYS.pop(_k)
# accepted values of [search] and [fixed] settings: the optimizer's, and the Settings' own
RANGES: dict[str, checks.Check] = {
    **OPTIM_RANGES, "batch_size": checks.at_least(1), "seq_len": checks.at_least(checks.MIN_LENGTH),
    "adapter_rank": checks.at_least(1), "lora_rank": checks.at_least(1), "scored_tokens": checks.at_least(1),
    "loss": checks.one_of(LOSSES),
}


@dataclass
class Profile:
    name: str
    device: str  # cpu | cuda | mps
    memory_budget_gb: float  # what edgezo may use, leaving room for the OS and other apps
    time_budget_min: float  # wall-clock budget of a run; converted into steps
    throughput_gflops: float  # effective sustained GFLOP/s of one forward on this device
    description: str = ""
    precision: str = "fp32"  # compute precision of unquantized weights
    quantization: str = "none"  # replaces precision as Settings.precision when not "none"
    optimizer: str = "auto"  # auto: fo-lora where it fits the budget (best adapter per minute), else zo-mopi
    runtime_gb: float | None = None  # override of the plan's runtime baseline (shared-memory devices)
    min_steps: int = 0  # the search only takes settings that leave this many steps in the time budget
    search: dict[str, list] = field(default_factory=dict)  # candidates largest_fitting chooses from
    fixed: dict = field(default_factory=dict)  # Settings fields fixed by the profile
    source: str = ""

    @property
    def settings_precision(self) -> str:
        return self.precision if self.quantization == "none" else self.quantization


def _profile_dir() -> Path:
    try:
        return Path(str(importlib.resources.files("edgezo.device_profiles")))
    except ModuleNotFoundError:  # a source checkout that isn't installed: profiles/ sits beside edgezo/
        return Path(__file__).resolve().parent.parent / "profiles"


def list_profiles() -> list[Profile]:
    """Every shipped profile, by name."""
    return [load_profile(str(p)) for p in sorted(_profile_dir().glob("*.toml"))]


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a user's .toml file."""
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml":
        path = _profile_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in _profile_dir().glob("*.toml")))
            raise EdgezoError(f"unknown profile {name_or_path!r}; use one of {shipped} or a path to a .toml file")
    if not path.is_file():
        raise EdgezoError(f"profile file {path} does not exist; pass a .toml path or a shipped profile name")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise EdgezoError(f"profile {path} is not valid TOML ({err}); fix the file") from err
    return _parse(data, str(path))


def _parse(data: dict, source: str) -> Profile:
    where = f"profile {source}"
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise EdgezoError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise EdgezoError(f"{where}: missing key(s) {missing}; required: {', '.join(REQUIRED)}")
    for key, value in data.items():
        kind, allowed = KEYS[key]
        _check_type(where, key, value, kind)
        if allowed and value not in allowed:
            raise EdgezoError(f"{where}: {key} = {value!r} is not one of {', '.join(allowed)}")
        if kind in (float, int) and (value < 0 if key == "min_steps" else value <= 0):
            raise EdgezoError(f"{where}: {key} must be positive, got {value}")
    search = {k: _check_candidates(where, k, v) for k, v in data.get("search", {}).items()}
    fixed = {k: _fixed_value(where, k, v) for k, v in data.get("fixed", {}).items()}
    if fixed.get("k", 0) > fixed.get("rank", fixed.get("k", 0)):
        raise EdgezoError(f"{where}: fixed.k must be an integer in [1, rank = {fixed['rank']}], got {fixed['k']}")
    return Profile(**{**data, "search": search, "fixed": fixed, "source": source})


def _check_type(where: str, key: str, value, kind: type) -> None:
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise EdgezoError(f"{where}: {key} must be a {kind.__name__}, got {type(value).__name__} {value!r}")


def _setting_value(where: str, key: str, value):
    """One value of a Settings field from TOML ("all" spells fuse=None, TOML having no null)."""
    if key == "fuse" and value == "all":
        return None
    kind = FIXED_KEYS[key]
    _check_type(where, key, value, kind)
    checks.check(RANGES, {key: value}, f"{where}: ")
    if kind is int and key not in RANGES and value <= 0:
        raise EdgezoError(f"{where}: {key} must be a positive integer, got {value}")
    return value


def _check_candidates(where: str, key: str, values) -> list:
    if key not in PRIORITY:
        raise EdgezoError(f"{where}: cannot search over {key!r}; searchable: {', '.join(PRIORITY)}")
    if not isinstance(values, list) or not values:
        raise EdgezoError(f"{where}: search.{key} must be a non-empty list of candidates")
    return [_setting_value(where, key, v) for v in values]


def _fixed_value(where: str, key: str, value):
    if key not in FIXED_KEYS:
        raise EdgezoError(f"{where}: unknown key fixed.{key}; valid: {', '.join(FIXED_KEYS)}")
    return _setting_value(where, key, value)


def resolve(profile: Profile, model, *, overrides: dict | None = None) -> tuple[Settings, MemoryPlan, int]:
    """(settings, their memory plan, steps that fit the time budget) of fine-tuning `model` on `profile`.

    `overrides` fixes Settings fields (e.g. from the command line); they are not searched.
    """
    overrides = dict(overrides or {})
    valid = {f.name for f in dataclasses.fields(Settings)}
    if set(overrides) - valid:
        raise EdgezoError(f"unknown setting(s) {sorted(set(overrides) - valid)}; valid: {', '.join(sorted(valid))}")
    budget = int(profile.memory_budget_gb * GiB)
    runtime = None if profile.runtime_gb is None else int(profile.runtime_gb * GiB)
    config = load_config(model)
    optimizer = overrides.pop("optimizer", profile.optimizer)
    if optimizer == "auto":  # first-order where it fits: it learns in ~100 forwards what ZO does not in 2,000
        first = _resolve_first_order(profile, config, overrides, budget, runtime)
        if first is not None:
            return first
        optimizer = "zo-mopi"
    own = {"optimizer": optimizer, "device": profile.device, "precision": profile.settings_precision}
    base = Settings(**{**own, **profile.fixed, **overrides})
    candidates = {k: v for k, v in profile.search.items() if k not in overrides}

    def enough_steps(s: Settings) -> bool:
        return steps_in_budget(profile, config, s) >= profile.min_steps

    chosen = largest_fitting(config, budget, candidates, base, runtime, enough_steps)
    if chosen is None:  # min_steps is out of reach: the fewest tokens per step that fit
        fewest = {k: [min(v)] if k in TOKEN_KEYS else v for k, v in candidates.items()}
        chosen = largest_fitting(config, budget, fewest, base, runtime)
    if chosen is None:
        raise _too_small(profile, config, base, candidates, budget, runtime)
    return chosen, plan(config, chosen, budget, runtime), steps_in_budget(profile, config, chosen)


def _resolve_first_order(profile: Profile, config, overrides: dict, budget: int,
                         runtime: int | None) -> tuple[Settings, MemoryPlan, int] | None:
    """fo-lora's settings for the profile if they fit its memory and time budgets, else None. Not for what
    fo-lora cannot do (streamed or quanto-quantized weights, state offloaded, trained biases and norms)."""
    fixed = {**profile.fixed, **overrides}
    if not first_order_can_run(profile.settings_precision, fixed):
        return None
    base = Settings(**{**fixed, "optimizer": FIRST_ORDER, "device": profile.device,
                       "precision": profile.settings_precision, "loss": fixed.get("loss", "scored")})
    candidates = {k: v for k, v in profile.search.items()
                  if k in ("pin_heap", "seq_len", "batch_size") and k not in overrides}
    chosen = largest_fitting(config, budget, candidates, base, runtime,
                             lambda s: steps_in_budget(profile, config, s) >= profile.min_steps)
    if chosen is None:
        return None
    return chosen, plan(config, chosen, budget, runtime), steps_in_budget(profile, config, chosen)


def _too_small(profile, config, base, candidates, budget, runtime) -> EdgezoError:
    smallest = {k: min(v, key=lambda x, k=k: candidate_size(k, x)) for k, v in candidates.items()}
    if "streaming" in candidates and base.precision not in FLOAT_PRECISIONS:
        smallest["streaming"] = False  # quantized weights are not streamed
    p = plan(config, dataclasses.replace(base, **smallest), budget, runtime)
    helps = ["lower seq_len or batch_size"]
    if base.device_type == "cuda" and "offload_state" not in candidates and not base.offload_state:
        helps = ["keep the state in host memory (search.offload_state = [false, true])"] + helps
    if base.precision in FLOAT_PRECISIONS:
        helps = ['quantize (quantization = "quanto-int4")', "stream layers (search.streaming = [false, true])"] + helps
    return EdgezoError(
        f"budget too small: profile {profile.name} allows {profile.memory_budget_gb:g} GiB but the smallest "
        f"settings need {p.peak_bytes / GiB:.2f} GiB; {', '.join(helps)}, or raise memory_budget_gb"
    )


def steps_in_budget(profile: Profile, config, s: Settings) -> int:
    """Steps that fit the time budget: a forward costs ~2·(matmul weights)·tokens (+ causal attention)."""
    a = anatomy(config)
    tokens = s.slices * s.batch_size * s.seq_len
    flops = 2 * a.linear_elems * tokens + 2 * a.blocks * a.hidden * s.seq_len * tokens
    seconds_per_step = flops / (profile.throughput_gflops * 1e9)
    return max(1, int(profile.time_budget_min * 60 / seconds_per_step))
