"""Device profiles: the shipped files load and resolve; bad files and impossible budgets say what to fix."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlamaConfig

from edgezo.errors import EdgezoError
from edgezo import plan as plan_mod
from edgezo.plan import GiB, PRIORITY, Settings
from edgezo.profiles import list_profiles, load_profile, resolve
from edgezo.runtime.synthetic import SHAPES

TINY = LlamaConfig(vocab_size=512, max_position_embeddings=512, **SHAPES["tiny"])
SMOL = LlamaConfig(**SHAPES["smollm2-135m"], vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M's shape
SHIPPED = {"raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "laptop-cpu-16gb", "apple-m-16gb", "rtx-4060-8gb",
           "phone-arm-12gb", "ci-2core"}

USER_TOML = """
name = "my-board"
device = "cpu"
memory_budget_gb = 3
time_budget_min = 10
throughput_gflops = 12.5
quantization = "quanto-int8"

[search]
seq_len = [128, 64]
batch_size = [8, 4, 2]
fuse = ["all", 1]

[fixed]
rank = 16
loss = "scored"
"""


def test_shipped_profiles_are_listed():
    profiles = {p.name: p for p in list_profiles()}
    assert SHIPPED <= set(profiles)
    for name, p in profiles.items():
        assert p.source.endswith(f"{name}.toml") and p.description


@pytest.mark.parametrize("config", [TINY, SMOL], ids=["tiny", "smollm2-135m"])
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_profile_resolves(name, config):
    profile = load_profile(name)
    settings, plan, steps = resolve(profile, config)
    assert plan.fits and plan.peak_bytes <= profile.memory_budget_gb * GiB
    assert settings.device == profile.device and steps >= 1
    # auto: fo-lora where it fits; otherwise (quanto weights here) zo-mopi
    wanted = "zo-mopi" if profile.settings_precision.startswith("quanto") else "fo-lora"
    assert settings.optimizer == (wanted if profile.optimizer == "auto" else profile.optimizer)


def test_auto_takes_fo_lora_where_it_fits_and_zo_mopi_where_it_does_not(tmp_path):
    import dataclasses

    profile = load_profile("laptop-cpu-16gb")
    assert profile.optimizer == "auto"
    assert resolve(profile, SMOL)[0].optimizer == "fo-lora"
    assert resolve(dataclasses.replace(profile, fixed={"streaming": True}), SMOL)[0].optimizer == "zo-mopi"
    fo, _, _ = resolve(profile, SMOL, overrides={"optimizer": "fo-lora"})
    zo, _, _ = resolve(profile, SMOL, overrides={"optimizer": "zo-mopi", "seq_len": fo.seq_len, "batch_size": fo.batch_size})
    # a budget between the two plans' peaks: only zeroth-order fits
    from edgezo.plan import plan
    low, high = sorted([plan(SMOL, fo).peak_bytes, plan(SMOL, zo).peak_bytes])
    tight = dataclasses.replace(profile, memory_budget_gb=(low + high) / 2 / GiB, search={"seq_len": [fo.seq_len], "batch_size": [fo.batch_size]})
    expected = "zo-mopi" if plan(SMOL, zo).peak_bytes < plan(SMOL, fo).peak_bytes else "fo-lora"
    assert resolve(tight, SMOL)[0].optimizer == expected


def test_user_toml(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text(USER_TOML)
    profile = load_profile(str(path))
    assert profile.name == "my-board" and profile.throughput_gflops == 12.5
    settings, plan, steps = resolve(profile, SMOL)
    assert settings.precision == "quanto-int8" and settings.rank == 16 and settings.loss == "scored"
    assert settings.seq_len in (128, 64) and settings.fuse in (None, 1) and plan.fits


def test_overrides_are_fixed_not_searched():
    settings, _, _ = resolve(load_profile("laptop-cpu-16gb"), TINY, overrides={"seq_len": 64, "optimizer": "mezo"})
    assert settings.seq_len == 64 and settings.optimizer == "mezo"
    with pytest.raises(EdgezoError, match="unknown setting"):
        resolve(load_profile("laptop-cpu-16gb"), TINY, overrides={"sequence": 64})


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, words", [
    ('colour = "red"\n' + USER_TOML, ["unknown key", "colour", "memory_budget_gb"]),
    (USER_TOML + 'colour = "red"\n', ["unknown key", "fixed.colour", "rank"]),
    (USER_TOML.replace("memory_budget_gb = 3", 'memory_budget_gb = "lots"'), ["memory_budget_gb", "float", "str"]),
    (USER_TOML.replace('device = "cpu"', 'device = "tpu"'), ["device", "tpu", "cpu, cuda, mps"]),
    (USER_TOML.replace("memory_budget_gb = 3", "memory_budget_gb = -1"), ["memory_budget_gb", "positive"]),
    (USER_TOML.replace("time_budget_min = 10\n", ""), ["missing", "time_budget_min"]),
    (USER_TOML.replace("seq_len = [128, 64]", "seq_len = [128, true]"), ["seq_len", "int", "bool"]),
    (USER_TOML.replace("seq_len = [128, 64]", "lr = [0.1]"), ["search over", "lr", "seq_len"]),
    ("name = [", ["not valid TOML"]),
    # every value in its accepted range
    (USER_TOML.replace("batch_size = [8, 4, 2]", "batch_size = [8, 0]"), ["batch_size must be an integer ≥ 1, got 0"]),
    (USER_TOML.replace("seq_len = [128, 64]", "seq_len = [128, 4]"), ["seq_len must be an integer ≥ 8, got 4"]),
    (USER_TOML + "interval = -1\n", ["interval must be an integer ≥ 0, got -1"]),
    (USER_TOML + "adapter_rank = 0\n", ["adapter_rank must be an integer ≥ 1, got 0"]),
    (USER_TOML + "k = 32\n", ["fixed.k must be an integer in [1, rank = 16], got 32"]),
    (USER_TOML + 'state_dtype = "fp8"\n', ["state_dtype must be one of fp32, fp16, bf16, got 'fp8'"]),
    (USER_TOML.replace('loss = "scored"', 'loss = "mean"'), ["loss must be one of full, scored, got 'mean'"]),
    (USER_TOML.replace('fuse = ["all", 1]', 'fuse = ["all", 0]'), ["fuse must be an integer ≥ 1"]),
])
def test_bad_profiles_name_the_key(tmp_path, text, words):
    with pytest.raises(EdgezoError) as err:
        load_profile(_write(tmp_path, text))
    for word in words:
        assert word in str(err.value)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(EdgezoError, match="unknown profile 'toaster'.*raspberry-pi-5-8gb"):
        load_profile("toaster")


def test_budget_too_small_names_the_smallest_peak_and_the_fixes():
    profile = dataclasses.replace(load_profile("raspberry-pi-5-8gb"), memory_budget_gb=0.5)
    with pytest.raises(EdgezoError) as err:
        resolve(profile, SMOL)
    message = str(err.value)
    for word in ("budget too small", "GiB", "quantize", "stream", "seq_len"):
        assert word in message


def test_larger_budget_gives_larger_settings():
    base = dataclasses.replace(load_profile("laptop-cpu-16gb"), min_steps=0)
    previous = None
    for gb in (1.5, 2, 3, 5, 8, 12):
        settings, plan, _ = resolve(dataclasses.replace(base, memory_budget_gb=gb), SMOL)
        assert plan.peak_bytes <= gb * GiB
        key = [_size(settings, k) for k in PRIORITY]
        assert previous is None or key >= previous, gb
        previous = key
    assert previous > [_size(resolve(dataclasses.replace(base, memory_budget_gb=1.5), SMOL)[0], k) for k in PRIORITY]


def test_min_steps_trades_tokens_per_step_for_steps():
    free = dataclasses.replace(load_profile("laptop-cpu-16gb"), min_steps=0)
    timed = dataclasses.replace(free, min_steps=300)
    _, _, few = resolve(free, SMOL)
    _, _, many = resolve(timed, SMOL)
    assert few < 300 <= many


def _size(s: Settings, key: str):
    return plan_mod.candidate_size(key, getattr(s, key))


def test_a_gpu_profile_moves_the_state_to_host_memory_only_when_nothing_fits_otherwise():
    rtx = dataclasses.replace(load_profile("rtx-4060-8gb"), min_steps=0, optimizer="zo-mopi")
    assert rtx.search["offload_state"] == [False, True]
    roomy, _, _ = resolve(rtx, SMOL)
    tight, tight_plan, _ = resolve(dataclasses.replace(rtx, memory_budget_gb=1.5), SMOL)
    assert not roomy.offload_state and not roomy.streaming
    assert tight.offload_state and not tight.streaming and tight_plan.host_bytes > 0
    assert plan_mod.plan(SMOL, dataclasses.replace(tight, offload_state=False)).peak_bytes > 1.5 * GiB
    fixed = dataclasses.replace(rtx, memory_budget_gb=0.5, search={k: v for k, v in rtx.search.items()
                                                                    if k != "offload_state"})
    with pytest.raises(EdgezoError, match="search.offload_state"):
        resolve(fixed, SMOL)


def test_a_searched_rank_below_k_gives_settings_the_optimizer_takes():
    """raspberry-pi-5-8gb searches rank down to 16, below the default k = 32: k is the rank then."""
    from edgezo.optim import check_settings

    s = Settings(optimizer="zo-mopi", rank=16, k=32)
    assert s.optimizer_kwargs()["k"] == 16
    check_settings("zo-mopi", **s.optimizer_kwargs())  # (raises on k > rank)
