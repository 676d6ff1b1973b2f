"""ZO over torch.distributed (gloo on 127.0.0.1): replicas equal one process, and a lost rank stops the run cleanly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny, token_batch
from safetensors import safe_open

from edgezo.checkpoint import CHECKPOINT, state_hash
from edgezo.delta import DeltaModel
from edgezo.distributed import MODES, make_parallel, shard
from edgezo.errors import EdgezoError
from edgezo.optim import make_optimizer
from edgezo.runtime.synthetic import save_model_dir

ROOT = Path(__file__).resolve().parents[1]
STEPS, N_PROBES = 4, 8
ONE_D = dict(train_1d=True, lr_1d=1e-2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_mean_lm_loss(model, batch, num_slices):
    """Next-token cross-entropy, averaged per row and then over rows in float64.

    A row's forward is bitwise the same whatever rows share its batch, so with float64 reductions the
    mean of two half-batch losses equals the whole batch's to ~1e-16: what is left to compare is the engine.
    """
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).double().mean(1).view(num_slices, -1).mean(1)


def _train(parallel=None, batch=None, arch="llama", **kw):
    delta = DeltaModel.attach(tiny(arch))
    opt = make_optimizer("zo-mopi", delta, seed=3, rank=8, k=4, interval=2, n_probes=N_PROBES, parallel=parallel, **kw)
    for _ in range(STEPS):
        opt.step(row_mean_lm_loss, token_batch() if batch is None else batch)
    return delta, opt


def _replica(rank: int, world: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for mode in MODES:
            parallel = make_parallel(mode)
            batch = shard(token_batch(), rank, world) if mode == "federated" else None  # each rank its own half
            delta, opt = _train(parallel, batch)
            torch.save({"state": {**delta.state_dict(), **opt.state_dict()["tensors"]},
                        "hash": state_hash(delta, opt), "sent": parallel.sent}, out / f"{mode}{rank}.pt")
        # biases and norms on (OPT has both): each rank evaluates its own slices, all apply the same g_i
        delta_1d, _ = _train(make_parallel("probe"), arch="opt", **ONE_D)
        torch.save(delta_1d.state_dict(), out / f"probe_1d{rank}.pt")
        try:  # a replica whose state differs is caught by the periodic hash check
            parallel.check_same(state_hash(delta, opt) if rank == 0 else "0" * 16, STEPS)
        except EdgezoError as err:
            (out / f"diverged{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    """data, probe and federated (each rank's own data = the data shards) all reproduce the one-process run."""
    torch.set_num_threads(1)
    mp.spawn(_replica, args=(2, free_port(), tmp_path), nprocs=2)  # one spawn for all modes: imports are slow
    delta, opt = _train()
    reference = {**delta.state_dict(), **opt.state_dict()["tensors"]}
    for mode in MODES:
        ranks = [torch.load(tmp_path / f"{mode}{r}.pt") for r in range(2)]
        assert ranks[0]["hash"] == ranks[1]["hash"], mode
        assert ranks[0]["sent"] / STEPS <= 1024, mode  # only the slice losses: ≤ 2N+1 float64
        assert reference.keys() == ranks[0]["state"].keys()
        for key, ref in reference.items():
            got = ranks[0]["state"][key]
            assert ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() <= 1e-6, (mode, key)
    reference_1d = _train(arch="opt", **ONE_D)[0].state_dict()
    assert any(k.endswith("_1d") for k in reference_1d)
    for rank in range(2):
        got = torch.load(tmp_path / f"probe_1d{rank}.pt")
        assert got.keys() == reference_1d.keys()
        for key, ref in reference_1d.items():
            assert ((got[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() <= 1e-6, key
    for rank in range(2):
        assert (tmp_path / f"diverged{rank}.txt").read_text().startswith(f"replicas diverged at step {STEPS}")


def test_shard_keeps_an_examples_rows_together():
    batch = {"input_ids": torch.arange(12)[:, None], "label": torch.arange(12) // 3}  # 4 examples of 3 rows
    halves = [shard(batch, r, 2, rows_per_example=3) for r in range(2)]
    assert [h["label"].tolist() for h in halves] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]]
    with pytest.raises(EdgezoError, match="multiple of 3"):
        shard(batch, 0, 3, rows_per_example=3)


def test_make_parallel_needs_a_process_group():
    with pytest.raises(EdgezoError, match="torchrun"):
        make_parallel("data")


# -- a rank dies: the others stop with a clear error, the checkpoint survives, --resume finishes --------
TUNE = """
import sys, torch
torch.set_num_threads(1)
from edgezo.distributed import init_from_env
from edgezo.errors import EdgezoError
from edgezo.tune import TuneConfig, tune
init_from_env(timeout_s=30)
model, data, out, steps, resume = sys.argv[1:6]
cfg = TuneConfig(optimizer="zo-mopi", task="lm", steps=int(steps), batch_size=4, max_length=16, checkpoint_every=2, eval_every=0,
                 adapter_rank=8, optim=dict(rank=8, k=4), distributed="data", hash_every=3)
try:
    tune(model, data, out, cfg, resume=resume == "1")
except EdgezoError as err:
    print("error:", err, file=sys.stderr)
    sys.exit(2)
torch.distributed.destroy_process_group()  # as the CLI does: exiting with gloo's threads alive may abort
"""


def _launch(tmp_path: Path, steps: int, resume: bool) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, "-c", TUNE, str(tmp_path / "model"), str(tmp_path / "d.jsonl"), str(tmp_path / "run"),
                str(steps), str(int(resume))]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only: rank 0 is writing
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def test_killed_rank_stops_the_others_and_resume_finishes(tmp_path):
    save_model_dir(tmp_path / "model", "llama")
    texts = ["the quick brown fox", "my name is ada", "i love this movie", "i hate waiting", "yes no true false"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts * 4))
    run = tmp_path / "run"
    procs = _launch(tmp_path, 100_000, resume=False)
    deadline = time.time() + 60
    while len(_steps_logged(run)) < 5:
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 2 and time.time() - start < 60
    assert "rank 0 lost contact with its peers at step" in err and "restart with --resume" in err, err[-2000:]
    procs[1].wait()

    with safe_open(str(run / CHECKPOINT), framework="pt") as f:  # intact: a complete, loadable safetensors file
        saved = json.loads(f.metadata()["edgezo"])["step"]
        assert all(f.get_tensor(k).isfinite().all() for k in f.keys())
    assert f"the last checkpoint is at step {saved}" in err and saved >= 2

    procs = _launch(tmp_path, saved + 4, resume=True)
    for proc in procs:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == saved + 4 and steps[-1]["world_size"] == 2 and 0 < steps[-1]["comm_bytes"] <= 1024
    assert [r["step"] for r in steps] == list(range(1, saved + 5))  # the killed run's later records were dropped
    assert (run / "adapter_model.safetensors").exists()
