"""The tune loop, nanoGPT-style: load -> batches -> step -> log -> eval -> checkpoint -> adapter.

Everything a step needs is a function of (seed, step): the batch (`data.batch_at`) and the probes.
So a checkpoint of the state at step s, written atomically, lets a run killed at any moment resume
and end with the same adapter bytes as a run never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgezo import checks
from edgezo import data as data_mod
from edgezo import lr_probe, metrics
from edgezo.checkpoint import CHECKPOINT, atomic_write, load_checkpoint, save_checkpoint, state_hash, truncate_jsonl
from edgezo.delta import DEFAULT_TARGETS, DeltaModel
from edgezo.distributed import MODES, PeerLost, Replicas, make_parallel
from edgezo.errors import EdgezoError
from edgezo.export import export_adapter
from edgezo.export_gguf import export_gguf_adapter
from edgezo.optim import FIRST_ORDER, OPTIMIZERS, ZOOptimizer, check_settings, make_optimizer
from edgezo.runtime.load import LoadedModel, load_model
from edgezo.runtime.memory import PeakMemory, pin_heap_threshold, usable_bytes

RUN_FILE = "run.json"
# optim settings only zeroth-order methods have: with any of them on, "auto" is zo-mopi
ZO_ONLY_OPTIM = ("train_1d", "lr_1d", "offload_state", "cuda_graph")
MAX_BAD_STEPS = 3  # consecutive non-finite losses before the run stops
VARIANTS = ("paper", "released")
# TuneConfig's accepted values (the optimizer's settings in `optim` are make_optimizer's to check)
RANGES: dict[str, checks.Check] = {
    "task": checks.one_of(data_mod.TASKS), "optimizer": checks.one_of(("auto",) + OPTIMIZERS),
    "variant": checks.one_of(VARIANTS), "steps": checks.at_least(1),
    "max_time": checks.optional(checks.above(0), "none (no time limit)"), "batch_size": checks.at_least(1),
    "max_length": checks.at_least(checks.MIN_LENGTH), "seed": checks.at_least(0),
    "eval_every": checks.at_least(0), "eval_fraction": checks.fraction(), "eval_batch_size": checks.at_least(1),
    "checkpoint_every": checks.at_least(1), "log_every": checks.at_least(1),
    "adapter_rank": checks.optional(checks.at_least(1), "none (exact)"),
    "distributed": checks.optional(checks.one_of(MODES)), "hash_every": checks.at_least(0),
    "optim": ((lambda v: isinstance(v, dict)), "a dict of optimizer settings"),
    "label_words": ((lambda v: v is None or isinstance(v, dict)), "a dict of label -> word, or none"),
    "template": ((lambda v: v is None or isinstance(v, str)), "a string, or none"),
}


@dataclass
class TuneConfig:
    task: str = "complete"
    # auto: fo-lora where its plan fits this device's free memory (on a CPU with the heap pinned if only so),
    # else zo-mopi (docs/defaults.md); or a method by name
    optimizer: str = "auto"
    variant: str = "paper"
    steps: int = 100
    max_time: float | None = None  # seconds; the run stops cleanly (checkpoint + adapter) when reached
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    targets: str = DEFAULT_TARGETS
    optim: dict = field(default_factory=dict)  # method / estimator overrides: lr, eps, n_probes, rank, k, ...
    eval_every: int = 20
    eval_fraction: float = 0.1
    eval_data: str | None = None  # a held-out file (same format as the data); None: an eval_fraction split
    eval_batch_size: int = 16
    checkpoint_every: int = 20
    log_every: int = 1
    adapter_rank: int | None = 64
    label_words: dict | None = None
    template: str | None = None
    distributed: str | None = None  # "data" | "probe" | "federated" over torch.distributed's default group
    hash_every: int = 10  # distributed: steps between checks that every rank holds the same state
    # cpu: pin glibc's heap (runtime.memory.pin_heap_threshold) for the rest of the process, so a fo-lora
    # backward's RSS stays at its live tensors (the plan's pin_heap), at the price of slower steps
    pin_heap: bool = False

    def validate(self) -> None:
        """One EdgezoError naming the first setting outside its accepted range (RANGES)."""
        checks.check(RANGES, dataclasses.asdict(self))
        if "adapter_rank" in self.optim:
            raise EdgezoError("adapter_rank is a TuneConfig setting: set TuneConfig.adapter_rank, not optim['adapter_rank']")
        if self.optimizer != "auto":  # (auto's method is chosen, and its settings checked, once the model is loaded)
            check_settings(self.optimizer, self.variant, **self.optim, adapter_rank=self.adapter_rank)
            return
        own = {k for k, v in self.optim.items() if not (k == "lr" and v == lr_probe.AUTO)} - set(ZO_ONLY_OPTIM)
        if own:  # an lr or a probe count means something else to each method
            raise EdgezoError(f"optimizer auto (the default) picks the method, and its settings with it; to set "
                              f"{', '.join(sorted(own))}, name the optimizer (--optimizer zo-mopi, fo-lora, ...)")


@dataclass
class TuneResult:
    out_dir: Path
    steps: int
    forwards: int
    final_loss: float
    eval: dict
    interrupted: bool  # stopped before `steps` (by max_time or a signal)
    stopped_by: str | None = None  # the signal's name, when a signal stopped it
    lr_probe: dict | None = None  # lr auto, when this call probed: {"lr", "forwards", "scores": {rate: loss}}
    gguf_adapter: Path | None = None  # adapter.gguf for llama.cpp/Ollama, written when the base was a .gguf
    gguf_skipped: str | None = None  # why a .gguf base got no adapter.gguf


def _fingerprint(cfg: TuneConfig, model_folder: str, data_path: Path) -> dict:
    """What must match for --resume to continue the same run (steps, max_time and the process count may change)."""
    free = ("steps", "max_time", "distributed", "hash_every", "pin_heap")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}
    # where the step runs, not what it computes (bitwise the same): a run may resume with them changed
    settings["optim"] = {k: v for k, v in settings["optim"].items() if k not in ("cuda_graph", "offload_state")}
    digest = hashlib.sha256(data_path.read_bytes()).hexdigest()[:16]
    if cfg.eval_data:  # the held-out file is part of the run too
        settings["eval_data_sha256"] = hashlib.sha256(Path(cfg.eval_data).read_bytes()).hexdigest()[:16]
    return {"model": str(model_folder), "data": str(data_path), "data_sha256": digest, "settings": settings}


def auto_settings(cfg: TuneConfig, model_config, precision: str, device: str):
    """The plan.Settings "auto" stands for with this run's batch and length, on this device's free memory now
    (plan.choose_optimizer: fo-lora where it fits, pinning the CPU heap if only so, else zo-mopi)."""
    from edgezo import plan

    settings = plan.Settings(batch_size=cfg.batch_size, seq_len=cfg.max_length, precision=precision, device=device,
                             loss="scored")
    return plan.choose_optimizer(model_config, settings, usable_bytes(device))


def _auto_optimizer(cfg: TuneConfig, loaded: LoadedModel, out: Path, resume: bool) -> tuple[str, bool]:
    """(optimizer, pin_heap) that "auto" stands for: a resumed run keeps the optimizer it started with."""
    from edgezo import plan

    started = json.loads((out / RUN_FILE).read_text())["settings"]["optimizer"] \
        if resume and (out / RUN_FILE).exists() else None
    # fo-lora's gradients are tensors (one process); the rest are settings only zeroth-order methods have
    if cfg.distributed or any(cfg.optim.get(key) for key in ZO_ONLY_OPTIM):
        return started or "zo-mopi", cfg.pin_heap
    chosen = auto_settings(cfg, loaded.model.config, loaded.precision, str(loaded.device))
    if started is None:
        return chosen.optimizer, cfg.pin_heap or chosen.pin_heap
    # fo-lora, resumed on a CPU where it no longer fits unpinned, goes on with the heap pinned
    unpinned_fits = chosen.optimizer == plan.FIRST_ORDER and not chosen.pin_heap
    return started, cfg.pin_heap or (started == plan.FIRST_ORDER and chosen.device_type == "cpu"
                                     and not unpinned_fits)


def _prepare_out_dir(out: Path, fingerprint: dict, resume: bool) -> bool:
    """Returns whether a checkpoint exists to resume from; refuses to mix two runs in one folder."""
    run_file = out / RUN_FILE
    if run_file.exists():
        saved = json.loads(run_file.read_text())
        if saved != json.loads(json.dumps(fingerprint)):
            raise EdgezoError(f"{out} holds a different run (other model, data or settings); choose another --out")
        has_checkpoint = (out / CHECKPOINT).exists()
        if resume and not has_checkpoint:
            raise EdgezoError(f"{out} holds this run but no checkpoint yet (it stopped before its first one), so "
                              "there is nothing to resume: drop --resume to start it over")
        if not resume and has_checkpoint:
            raise EdgezoError(f"{out} already holds this run; pass --resume to continue it or choose another --out")
        if not has_checkpoint:  # starting over: the metrics of the attempt that left no checkpoint go
            (out / metrics.METRICS).unlink(missing_ok=True)
        return has_checkpoint
    if out.exists() and any(out.iterdir()):
        raise EdgezoError(f"{out} is not empty and holds no edgezo run; choose an empty or new --out folder")
    if resume:
        raise EdgezoError(f"{out} holds no run to resume: drop --resume to start a new run there")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(fingerprint, indent=2)))
    return False


def _parallel(cfg: TuneConfig, task: data_mod.TaskData) -> Replicas | None:
    if not cfg.distributed:
        return None
    rows = len(task.labels) if task.task == "classify" else 1  # classify: an example is one row per label
    return make_parallel(cfg.distributed, rows_per_example=rows, batch_size=cfg.batch_size)


def _shared_settings(cfg: TuneConfig, fingerprint: dict) -> dict:
    """What every rank must have been given: all settings, and the same data unless each brings its own."""
    data = None if cfg.distributed == "federated" else fingerprint["data_sha256"]
    return {"config": dataclasses.asdict(cfg), "data": data}


def _agree(parallel: Replicas, cfg: TuneConfig, delta: DeltaModel, opt: ZOOptimizer, stopping: bool) -> bool:
    """Every hash_every steps check that the replicas are identical; stop all ranks at the same step."""
    step = opt.state.step
    if cfg.hash_every and (step % cfg.hash_every == 0 or step == cfg.steps):
        parallel.check_same(state_hash(delta, opt), step)
    return parallel.any(stopping)


@contextlib.contextmanager
def _lost_peers(where: Callable[[], tuple[int, int | None]]):
    """A dead or silent peer ends the run on every rank with where it stopped and how to go on."""
    try:
        yield
    except PeerLost as err:
        step, saved = where()
        last = f"the last checkpoint is at step {saved}" if saved is not None else "no checkpoint was written yet"
        raise EdgezoError(f"rank {err.rank} lost contact with its peers at step {step} ({err.cause}); "
                          f"{last}; restart with --resume") from None


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""

    def __init__(self):
        self.raised = None
        self._old = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _auto_lr(cfg: TuneConfig) -> bool:
    auto = cfg.optim.get("lr") == lr_probe.AUTO and cfg.optimizer != FIRST_ORDER
    if auto and cfg.distributed == "federated":  # each rank would score the rates on its own data
        raise EdgezoError("lr auto picks the rate on the held-out rows of one data set; with --distributed "
                          "federated each rank has its own: pass a number with --lr")
    return auto


def _optim_settings(cfg: TuneConfig) -> dict:
    """cfg.optim for make_optimizer: a forward-only schedule spans the run's steps; lr auto starts at the
    default (probed later; fo-lora keeps its default: it has no probe)."""
    settings = {k: v for k, v in cfg.optim.items() if not (k == "lr" and v == lr_probe.AUTO)}
    return settings if cfg.optimizer == FIRST_ORDER else {"horizon": cfg.steps, **settings}


def _probe_lr(cfg: TuneConfig, task: data_mod.TaskData, opt: ZOOptimizer, loss_fn, device, log) -> dict:
    """lr auto: edgezo/lr_probe.py picks the rate from the starting state (and sets it); logged."""
    steps = min(lr_probe.PROBE_STEPS, cfg.steps)  # (a short run is not probed for longer than it runs)
    batches = [{k: v.to(device) for k, v in data_mod.batch_at(task, cfg.batch_size, cfg.seed, i).items()}
               for i in range(steps)]
    held = {k: v.to(device) for k, v in lr_probe.held_out_batch(task, cfg.batch_size, cfg.seed, steps).items()}
    found = lr_probe.probe_lr(opt, loss_fn, batches, held, lr_probe.candidates(cfg.optimizer, cfg.variant))
    record = {"lr": found.lr, "forwards": found.forwards, "scores": {f"{lr:g}": s for lr, s in found.scores.items()}}
    log({"step": 0, "forwards": found.forwards, "lr": found.lr, "lr_probe": record["scores"]})
    return record


def _lr(opt, step: int) -> float:
    """The rate step `step` ran at (the schedule's, forward-only; fo-lora's is fixed)."""
    return opt.lr_at(step) if isinstance(opt, ZOOptimizer) else opt.config.lr


def _export_gguf(out: Path, source: Path | None) -> tuple[Path | None, str | None]:
    """The GGUF adapter beside the PEFT files when the base came from a .gguf; a run whose adapter
    llama.cpp cannot hold (trained norms, a tied lm_head) keeps its PEFT adapter and says why not."""
    if source is None:
        return None, None
    try:
        return export_gguf_adapter(out, source), None
    except EdgezoError as err:
        return None, str(err)


def tune(
    model: LoadedModel | str | Path,
    data: str | Path,
    out: str | Path,
    config: TuneConfig | None = None,
    *,
    resume: bool = False,
    precision: str = "fp32",
    device: str = "cpu",
    callback: Callable[[dict], None] | None = None,
) -> TuneResult:
    """Fine-tune `model` on the file `data` (forward passes only, or fo-lora's budgeted backprop); writes a PEFT
    adapter into `out`."""
    cfg = config or TuneConfig()
    cfg.validate()  # before anything is loaded: a bad value costs nothing
    loaded = model if isinstance(model, LoadedModel) else load_model(model, precision=precision, device=device)
    data_path, out = Path(data), Path(out)
    task = data_mod.load_task_data(
        data_path, loaded.tokenizer, cfg.task, eval_fraction=cfg.eval_fraction, max_length=cfg.max_length,
        label_words=cfg.label_words, template=cfg.template, seed=cfg.seed, eval_path=cfg.eval_data,
    )

    if cfg.optimizer == "auto":  # first-order where it fits this device now, else ZO-MOPI (plan.choose_optimizer)
        optimizer, pin_heap = _auto_optimizer(cfg, loaded, Path(out), resume)
        cfg = dataclasses.replace(cfg, optimizer=optimizer, pin_heap=pin_heap)
    if cfg.pin_heap:
        if loaded.device.type != "cpu":
            raise EdgezoError(f"pin_heap pins the CPU heap; the model is on {loaded.device}: turn it off")
        if not pin_heap_threshold():
            raise EdgezoError("pin_heap needs glibc (Linux) and this C library cannot be pinned: turn it off, "
                              "and lower batch_size or max_length if the run does not fit without it")
    delta = DeltaModel.attach(loaded.model, cfg.targets)
    if cfg.optim.get("offload_state") and delta.targets[0].device.type != "cuda":
        raise EdgezoError(f"offload_state moves the trainable state off a GPU; on {delta.targets[0].device.type} "
                          "it is in host memory already: turn it off")
    parallel = _parallel(cfg, task)
    writer = parallel is None or parallel.rank == 0  # rank 0 alone writes into `out`
    opt = make_optimizer(cfg.optimizer, delta, seed=cfg.seed, variant=cfg.variant,
                         adapter_rank=cfg.adapter_rank, parallel=parallel, **_optim_settings(cfg))
    # only now, with every setting validated, may the run claim `out`
    fingerprint = _fingerprint(cfg, loaded.folder, data_path)
    claim = functools.partial(_prepare_out_dir, out, fingerprint, resume)
    has_checkpoint = parallel.start(claim, _shared_settings(cfg, fingerprint)) if parallel else claim()
    loss_fn = data_mod.make_loss(task)
    metrics_path = out / metrics.METRICS
    forwards, elapsed_before = 0, 0.0
    if resume and has_checkpoint:
        info = load_checkpoint(out, delta, opt)  # every rank: rank 0's checkpoint in the shared `out`
        forwards, elapsed_before = info["forwards"], info["elapsed_s"]
        opt.config.lr = info.get("lr", opt.config.lr)  # lr auto: the probe's choice, never probed again
        if writer:
            truncate_jsonl(metrics_path, opt.state.step)
    saved_step = opt.state.step if has_checkpoint else None

    def log(record: dict) -> None:
        if not writer:
            return
        metrics.append(metrics_path, record)
        if callback:
            callback(record)

    def checkpoint() -> None:
        nonlocal saved_step
        if writer:
            save_checkpoint(out, delta, opt, {"forwards": forwards, "elapsed_s": elapsed_before + time.time() - start,
                                              "lr": opt.config.lr})
        saved_step = opt.state.step

    start, bad_steps, last_loss, last_eval, interrupted, probed = time.time(), 0, float("nan"), {}, False, None
    with PeakMemory(loaded.device) as mem, _StopFlag() as stop, _lost_peers(lambda: (opt.state.step, saved_step)):
        if opt.state.step == 0 and _auto_lr(cfg):
            probed = _probe_lr(cfg, task, opt, loss_fn, loaded.device, log)
            forwards += probed["forwards"]
        if cfg.eval_every and opt.state.step == 0:  # the starting point, so every curve has its baseline
            last_eval = data_mod.evaluate(delta.model, task, cfg.eval_batch_size)
            log({"step": 0, "forwards": 0, **last_eval})
        while opt.state.step < cfg.steps:
            step = opt.state.step
            sent = parallel.sent if parallel else 0
            batch = {k: v.to(loaded.device) for k, v in data_mod.batch_at(task, cfg.batch_size, cfg.seed, step).items()}
            try:
                result = opt.step(loss_fn, batch)
            except FloatingPointError as err:  # nothing was applied: skip this step's probes
                bad_steps += 1
                opt.skip_step()
                log({"step": step + 1, "skipped": str(err)})
                if bad_steps >= MAX_BAD_STEPS:
                    raise EdgezoError(
                        f"the loss was non-finite {bad_steps} steps in a row; lower the learning rate "
                        f"(optim lr={opt.config.lr:g}) or eps, then --resume from the last checkpoint"
                    ) from None
                continue
            bad_steps, forwards, last_loss = 0, forwards + result.forwards, result.loss
            now = elapsed_before + time.time() - start
            step = opt.state.step
            stopping = bool(stop.raised or (cfg.max_time and now >= cfg.max_time))
            if parallel:
                stopping = _agree(parallel, cfg, delta, opt, stopping)
            if step % cfg.log_every == 0 or step == cfg.steps:
                ranks = {"world_size": parallel.world, "comm_bytes": parallel.sent - sent} if parallel else {}
                log({"step": step, "loss": result.loss, "forwards": forwards, "peak_mem_bytes": mem.read(),
                     "elapsed_s": round(now, 3), "lr": _lr(opt, step - 1), "refreshed": result.refreshed, **ranks})
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps or stopping):
                last_eval = data_mod.evaluate(delta.model, task, cfg.eval_batch_size)
                log({"step": step, "forwards": forwards, **last_eval})
            if step % cfg.checkpoint_every == 0:
                checkpoint()
            if stopping:
                interrupted = True
                break
        checkpoint()
    if writer:
        export_adapter(delta, out, loaded.folder, max_rank=cfg.adapter_rank)
        gguf_adapter, gguf_skipped = _export_gguf(out, loaded.source)
        metrics.plot_curves(metrics_path, out / metrics.CURVES)
    delta.detach()
    if stop.raised:
        log({"step": opt.state.step, "stopped_by": stop.raised})
    return TuneResult(out, opt.state.step, forwards, last_loss, last_eval, interrupted, stop.raised, probed,
                      gguf_adapter if writer else None, gguf_skipped if writer else None)
