"""The tune loop: outputs, exact resume after SIGKILL, NaN handling, PEFT-compatible adapters."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import edgezo.data
from edgezo.delta import DeltaModel
from edgezo.errors import EdgezoError
from edgezo.export import export_adapter
from edgezo.optim import make_optimizer
from edgezo.runtime.load import load_model
from edgezo.runtime.synthetic import save_model_dir
from edgezo.tune import TuneConfig, tune

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(optimizer="zo-mopi", task="lm", steps=12, batch_size=4, max_length=24, eval_every=4, checkpoint_every=2,
              optim=dict(rank=8, k=4, n_probes=4, interval=5))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("tune") / "llama", "llama")


@pytest.fixture(scope="module")
def lm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "notes.txt"
    path.write_text("\n".join(f"my name is ada and i live in lisbon {i}" for i in range(20)) + "\n")
    return path


def test_tune_writes_adapter_metrics_curves_checkpoint(tiny_dir, lm_file, tmp_path):
    result = tune(tiny_dir, lm_file, tmp_path / "run", TuneConfig(**CONFIG))
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "curves.png",
                 "checkpoint.safetensors"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"step", "loss", "forwards", "peak_mem_bytes", "elapsed_s"} <= r.keys() for r in steps)
    assert steps[-1]["forwards"] == 12 * 5
    assert any("eval_loss" in r for r in records)
    assert result.steps == 12
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir.resolve())


def test_out_dir_guards(tiny_dir, lm_file, tmp_path):
    out = tmp_path / "run"
    tune(tiny_dir, lm_file, out, TuneConfig(**{**CONFIG, "steps": 2}))
    with pytest.raises(EdgezoError, match="--resume"):
        tune(tiny_dir, lm_file, out, TuneConfig(**{**CONFIG, "steps": 2}))
    with pytest.raises(EdgezoError, match="different run"):
        tune(tiny_dir, lm_file, out, TuneConfig(**{**CONFIG, "seed": 5}), resume=True)


_RUNNER = """
import sys
from edgezo.tune import TuneConfig, tune
cfg = TuneConfig(**{cfg})
tune(sys.argv[1], sys.argv[2], sys.argv[3], cfg, resume=len(sys.argv) > 4)
"""


# lr auto (the probe runs once; its choice is in the checkpoint), a cosine schedule and the adaptive step
AUTO = {**CONFIG, "optim": {**CONFIG["optim"], "lr": "auto", "schedule": "cosine", "warmup": 2, "adaptive": True}}


def _tune_process(tiny_dir, lm_file, out, resume=False, config=CONFIG):
    code = _RUNNER.replace("{cfg}", repr(config))
    args = [sys.executable, "-c", code, str(tiny_dir), str(lm_file), str(out)] + (["resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _logged_steps(path: Path) -> int:
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((r["step"] for r in lines if "loss" in r), default=0)


@pytest.mark.parametrize("config", [CONFIG, AUTO], ids=["default", "auto-cosine-adaptive"])
def test_resume_after_sigkill_gives_identical_adapter(tiny_dir, lm_file, tmp_path, config):
    reference = tmp_path / "reference"
    assert _tune_process(tiny_dir, lm_file, reference, config=config).wait() == 0

    killed = tmp_path / "killed"
    proc = _tune_process(tiny_dir, lm_file, killed, config=config)
    while _logged_steps(killed / "metrics.jsonl") < 7 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter_model.safetensors").exists()  # it really died mid-run
    assert _tune_process(tiny_dir, lm_file, killed, resume=True, config=config).wait() == 0

    assert (killed / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    ours, theirs = load_file(killed / "checkpoint.safetensors"), load_file(reference / "checkpoint.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # (its metadata holds times)
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 13))  # records past the checkpoint were dropped, then logged again
    records = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (killed, reference)]
    assert [r["forwards"] for r in records[0] if "loss" in r] == [r["forwards"] for r in records[1] if "loss" in r]
    assert [r for r in records[0] if "lr_probe" in r] == [r for r in records[1] if "lr_probe" in r]  # probed once


def test_lr_auto_probes_counts_its_forwards_and_the_schedule_is_logged(tiny_dir, lm_file, tmp_path):
    result = tune(tiny_dir, lm_file, tmp_path / "run", TuneConfig(**AUTO))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in records if "lr_probe" in r]
    assert len(probe) == 1 and len(probe[0]["lr_probe"]) == 3
    assert probe[0]["forwards"] == 3 * (10 * 5 + 1)  # 3 rates × 10 steps × 5 forwards, + 1 held-out each
    assert result.lr_probe["lr"] == probe[0]["lr"] and result.lr_probe["forwards"] == probe[0]["forwards"]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["forwards"] == probe[0]["forwards"] + 12 * 5 == result.forwards
    lr = probe[0]["lr"]
    assert [r["lr"] for r in steps[:2]] == pytest.approx([lr / 2, lr])  # warmup 2 ...
    assert steps[-1]["lr"] < 0.05 * lr and all(a >= b for a, b in zip([s["lr"] for s in steps[1:]],
                                                                     [s["lr"] for s in steps[2:]]))  # ... cosine


def test_nonfinite_loss_steps_are_skipped_then_the_run_stops(tiny_dir, lm_file, tmp_path, monkeypatch):
    real = edgezo.data.make_loss
    calls = {"n": 0}

    def flaky(task):
        loss = real(task)

        def wrapped(model, batch, num_slices):
            calls["n"] += 1
            value = loss(model, batch, num_slices)
            return value * float("nan") if calls["n"] == 3 or calls["n"] > 6 else value

        return wrapped

    monkeypatch.setattr(edgezo.data, "make_loss", flaky)
    out = tmp_path / "run"
    with pytest.raises(EdgezoError, match="non-finite"):
        tune(tiny_dir, lm_file, out, TuneConfig(**{**CONFIG, "eval_every": 0}))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("skipped" in r for r in records) == 4  # the lone bad step, then three in a row
    assert (out / "checkpoint.safetensors").exists()  # the last good checkpoint is intact
    assert any("loss" in r and r["step"] > 3 for r in records)  # it went on after the lone bad step


def test_peft_loads_the_adapter_with_the_same_logits(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import lm_loss

    loaded = load_model(tiny_dir)
    delta = DeltaModel.attach(loaded.model)
    opt = make_optimizer("zo-mopi", delta, seed=0, rank=8, k=4, interval=3, lr=5e-2)
    ids = torch.randint(4, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(7):  # two refreshes: adapter and current window both non-zero
        opt.step(lm_loss, {"input_ids": ids})
    with torch.no_grad():
        ours = loaded.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
        plain = base(input_ids=ids).logits
    export_adapter(delta, tmp_path / "adapter", tiny_dir)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-4  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_where_the_step_runs_is_not_part_of_the_run(lm_file):
    # cuda_graph and offload_state compute the same step bitwise: a run resumes with them switched
    from edgezo.tune import _fingerprint

    def fingerprint(**optim):
        return _fingerprint(TuneConfig(**{**CONFIG, "optim": {**CONFIG["optim"], **optim}}), "model", lm_file)

    assert fingerprint(offload_state=True, cuda_graph=True) == fingerprint()
    assert fingerprint(lr=0.5) != fingerprint()


# -- every setting is checked before anything loads: one line naming the value and the accepted range ------

@pytest.mark.parametrize("field, value, words", [
    ("steps", 0, "steps must be an integer ≥ 1, got 0"),
    ("batch_size", 0, "batch_size must be an integer ≥ 1, got 0"),
    ("batch_size", 2.5, "batch_size must be an integer ≥ 1, got 2.5"),
    ("max_length", 2, "max_length must be an integer ≥ 8, got 2"),
    ("max_time", 0, "max_time must be a number > 0, or none"),
    ("max_time", -5.0, "max_time must be a number > 0"),
    ("eval_every", -1, "eval_every must be an integer ≥ 0"),
    ("eval_fraction", 1.0, r"eval_fraction must be a number in \(0, 1\), got 1.0"),
    ("eval_fraction", 0, r"eval_fraction must be a number in \(0, 1\)"),
    ("eval_batch_size", 0, "eval_batch_size must be an integer ≥ 1"),
    ("checkpoint_every", 0, "checkpoint_every must be an integer ≥ 1"),
    ("log_every", 0, "log_every must be an integer ≥ 1"),
    ("adapter_rank", 0, "adapter_rank must be an integer ≥ 1, or none"),
    ("seed", -1, "seed must be an integer ≥ 0"),
    ("task", "chat-ish", "task must be one of classify, complete, lm, got 'chat-ish'"),
    ("optimizer", "adam", "optimizer must be one of auto, zo-mopi, zo-muon, lozo, mezo, fo-lora"),
    ("variant", "old", "variant must be one of paper, released"),
    ("distributed", "tensor", "distributed must be one of data, probe, federated, or none"),
    ("optim", {"lr": 0.0}, "zo-mopi: lr must be a number > 0, or 'auto', got 0.0"),
    ("optim", {"lr": -1e-3}, "zo-mopi: lr must be a number > 0"),
    ("optim", {"eps": 0}, "zo-mopi: eps must be a number > 0"),
    ("optim", {"n_probes": 0}, "zo-mopi: n_probes must be an integer ≥ 1"),
    ("optim", {"rank": 0}, "zo-mopi: rank must be an integer ≥ 1"),
    ("optim", {"k": 0}, "zo-mopi: k must be an integer ≥ 1"),
    ("optim", {"rank": 8, "k": 16}, r"zo-mopi: k must be an integer in \[1, rank = 8\], got 16"),
    ("optim", {"beta": 1.0}, r"zo-mopi: beta must be a number in \[0, 1\)"),
    ("optim", {"interval": -1}, "zo-mopi: interval must be an integer ≥ 0"),
    ("optim", {"fuse": 0}, "zo-mopi: fuse must be an integer ≥ 1, or none"),
    ("optim", {"state_dtype": "fp8"}, "zo-mopi: state_dtype must be one of fp32, fp16, bf16"),
    ("optim", {"two_sided": "yes"}, "zo-mopi: two_sided must be true or false"),
    ("optim", {"lr_1d": 0}, "zo-mopi: lr_1d must be a number > 0"),
    ("optim", {"learning_rate": 1e-3}, r"unknown setting\(s\) \['learning_rate'\] for zo-mopi; valid: .*'lr'"),
    ("optim", {"adapter_rank": 4}, "set TuneConfig.adapter_rank, not optim"),
])
def test_out_of_range_settings_stop_before_the_model_loads(tmp_path, field, value, words):
    with pytest.raises(EdgezoError, match=words):  # no such model: the check comes first
        tune(tmp_path / "no-model", tmp_path / "no-data.txt", tmp_path / "run",
             TuneConfig(**{"optimizer": "zo-mopi", field: value}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer, optim, words", [
    ("zo-muon", {"orthogonalizer": "qr"}, "zo-muon: orthogonalizer must be one of ns5, svd, sgd"),
    ("fo-lora", {"lr": 0}, "fo-lora: lr must be a number > 0"),
    ("fo-lora", {"betas": (0.9, 1.0)}, r"fo-lora: betas must be two of \(a number in \[0, 1\)\)"),
    ("fo-lora", {"weight_decay": -0.1}, "fo-lora: weight_decay must be a number ≥ 0"),
    ("fo-lora", {"k": 4}, r"unknown setting\(s\) \['k'\] for fo-lora"),
    ("auto", {"lr": 1e-3, "rank": 8}, r"optimizer auto \(the default\) picks the method.*to set lr, rank, name the"),
])
def test_each_optimizers_settings_are_checked(tmp_path, optimizer, optim, words):
    with pytest.raises(EdgezoError, match=words):
        TuneConfig(optimizer=optimizer, optim=optim).validate()


def test_in_range_settings_pass():
    TuneConfig(optimizer="zo-mopi", optim={"lr": "auto", "rank": 8}).validate()  # a default k above the rank is clamped
    TuneConfig(optimizer="zo-mopi", max_time=None, adapter_rank=None, eval_every=0,
               optim={"fuse": None, "beta": 0.0}).validate()
    TuneConfig(optim={"lr": "auto", "train_1d": True}).validate()  # what auto leaves to the method it picks
    TuneConfig(optimizer="fo-lora", optim={"lr": 1e-3, "rank": 4, "betas": [0.9, 0.99]}).validate()


def test_resume_with_nothing_to_resume_is_an_error(tiny_dir, lm_file, tmp_path):
    config = TuneConfig(**{**CONFIG, "steps": 2})
    with pytest.raises(EdgezoError, match="holds no run to resume: drop --resume to start a new run"):
        tune(tiny_dir, lm_file, tmp_path / "new", config, resume=True)
    assert not (tmp_path / "new").exists()
    out = tmp_path / "run"
    tune(tiny_dir, lm_file, out, config)
    (out / "checkpoint.safetensors").unlink()  # as if killed before its first checkpoint
    with pytest.raises(EdgezoError, match="no checkpoint yet .* drop --resume to start it over"):
        tune(tiny_dir, lm_file, out, config, resume=True)
    result = tune(tiny_dir, lm_file, out, config)  # without --resume it starts over, its old metrics gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and steps.count(0) == 1 and steps.count(2) == 2  # (step 2: its loss and eval)
