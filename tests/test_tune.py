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
CONFIG = dict(task="lm", steps=12, batch_size=4, max_length=24, eval_every=4, checkpoint_every=2,
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
