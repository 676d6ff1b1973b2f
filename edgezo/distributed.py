"""ZO fine-tuning over torch.distributed with only slice losses on the wire.

Every rank holds the whole model and the same optimizer state, and derives every probe from
(seed, step, probe). So ranks stay identical by exchanging nothing but the step's S slice losses
(S ≤ 2N+1 float64 scalars, 72 bytes for ZO-MOPI with N=8), whatever the model's size.

  data      every rank evaluates all S slices on its equal shard of the batch (whole examples);
            the losses are averaged over ranks
  federated the same, but each rank's batch is its own local data (no sharding)
  probe     every rank evaluates its share of the slices (rank::world) on the whole batch;
            the losses are gathered

Both use all_gather, then combine the parts in rank order on every rank: the losses, hence g and
the updates, are bitwise identical everywhere, whatever reduction order the backend would use.
`sent` counts the bytes this rank contributed to collectives (for all_gather its own part; an
all_reduce of n bytes would count n), the same convention as a first-order DDP step's gradient bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from edgezo.errors import EdgezoError

MODES = ("data", "probe", "federated")
LocalEval = Callable[[list, dict], torch.Tensor]  # (sub-plan, sub-batch) -> (len(sub-plan),) float64 losses


class PeerLost(EdgezoError):
    """A collective failed: a peer died, or stopped answering within the process group's timeout."""

    def __init__(self, rank: int, cause: str):
        super().__init__(f"rank {rank} lost contact with its peers ({cause})")
        self.rank, self.cause = rank, cause


def init_from_env(device: str = "cpu", backend: str | None = None,
                  timeout_s: float = 300.0) -> dist.ProcessGroup | None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT); None if WORLD_SIZE ≤ 1.

    gloo for CPU, nccl for CUDA (each rank on GPU LOCAL_RANK). A peer that stops answering for
    `timeout_s` fails the collectives of the others; keep it above the longest eval or checkpoint.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def rank_device(device: str) -> str:
    """The device this rank should load onto: "cuda" means this rank's own GPU (LOCAL_RANK)."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device


def shard(batch: dict[str, torch.Tensor], rank: int, world: int, rows_per_example: int = 1) -> dict[str, torch.Tensor]:
    """Rank's contiguous equal share of the batch's examples (an example is `rows_per_example` rows)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % (rows_per_example * world):
        raise EdgezoError(f"a batch of {rows // rows_per_example} examples does not split into {world} equal "
                          f"shards; use a batch size that is a multiple of {world}")
    per = rows // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def _cause(err: Exception) -> str:
    """The first sentence of a backend error, without gloo's "[source.cc:line]" prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [""])[0])
    return text.split(". ")[0][:200] or type(err).__name__


class Replicas:
    """This rank's side of the group: collectives that count the bytes sent and name a lost peer."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.sent = 0
        # nccl only moves CUDA tensors
        nccl = dist.get_backend(group) == "nccl"
        self.wire = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape everywhere), in rank order, on the CPU."""
        tensor = tensor.to(self.wire)
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        try:
            dist.all_gather(parts, tensor, group=self.group)
        except RuntimeError as err:  # DistBackendError (peer closed, timeout) is a RuntimeError
            raise PeerLost(self.rank, _cause(err)) from None
        self.sent += tensor.numel() * tensor.element_size()
        return [p.cpu() for p in parts]

    def any(self, flag: bool) -> bool:
        """Whether any rank raised `flag` (so that all ranks stop at the same step)."""
        return any(bool(p) for p in self.gather(torch.tensor([flag], dtype=torch.uint8)))

    def digests(self, text: str) -> list[str]:
        """Every rank's 16-hex-digit digest of `text` (a fixed-size tensor of 16 bytes)."""
        mine = hashlib.sha256(text.encode()).hexdigest()[:16]
        parts = self.gather(torch.tensor(list(mine.encode()), dtype=torch.uint8))
        return [bytes(p.tolist()).decode() for p in parts]

    def check_same(self, state_hash: str, step: int) -> None:
        """Stop the run if the replicas' trainable states have drifted apart."""
        hashes = self.digests(state_hash)
        if len(set(hashes)) > 1:
            listing = ", ".join(f"rank {r} {h}" for r, h in enumerate(hashes))
            raise EdgezoError(f"replicas diverged at step {step}: state hashes {listing}; check that every rank "
                              "runs the same edgezo, torch and hardware, then --resume from the last checkpoint")

    def start(self, prepare: Callable[[], bool], settings: dict) -> bool:
        """Rank 0 runs prepare() (it claims the run folder and says whether a checkpoint exists);
        every rank gets its answer, and all must have been started with the same settings."""
        answer, error = 0, None
        if self.rank == 0:
            try:
                answer = 1 + int(prepare())
            except EdgezoError as err:  # tell the others before failing, so they do not wait for us
                error = err
        parts = self.gather(torch.tensor([answer], dtype=torch.uint8))
        if error is not None:
            raise error
        if int(parts[0]) == 0:
            raise EdgezoError("rank 0 could not prepare the run folder; see its error")
        if len(set(self.digests(json.dumps(settings, sort_keys=True, default=str)))) > 1:
            raise EdgezoError("the ranks were started with different settings or data; "
                              "give every rank the same command")
        return int(parts[0]) == 2

    def losses(self, plan: list, batch: dict, local_eval: LocalEval) -> torch.Tensor:
        """The (S,) losses of the plan's slices on the whole batch, identical on every rank."""
        raise NotImplementedError


class DataParallel(Replicas):
    """All slices on this rank's shard of the batch (or its own data); losses averaged over ranks."""

    def __init__(self, group: dist.ProcessGroup | None = None, rows_per_example: int = 1, shard_batch: bool = True):
        super().__init__(group)
        self.rows_per_example, self.shard_batch = rows_per_example, shard_batch

    def losses(self, plan: list, batch: dict, local_eval: LocalEval) -> torch.Tensor:
        mine = shard(batch, self.rank, self.world, self.rows_per_example) if self.shard_batch else batch
        # equal shards: the mean of the ranks' mean losses is the whole batch's mean loss
        return torch.stack(self.gather(local_eval(plan, mine))).sum(0) / self.world


class ProbeParallel(Replicas):
    """Slices rank, rank+world, ... on the whole batch; the S losses gathered from all ranks."""

    def losses(self, plan: list, batch: dict, local_eval: LocalEval) -> torch.Tensor:
        width = -(-len(plan) // self.world)  # all_gather needs equal parts: pad the shorter ones
        part = torch.zeros(width, dtype=torch.float64)
        mine = plan[self.rank :: self.world]
        if mine:
            part[: len(mine)] = local_eval(mine, batch)
        out = torch.empty(len(plan), dtype=torch.float64)
        for r, got in enumerate(self.gather(part)):
            out[r :: self.world] = got[: len(plan[r :: self.world])]
        return out


def make_parallel(mode: str, group: dist.ProcessGroup | None = None, *, rows_per_example: int = 1,
                  batch_size: int | None = None) -> Replicas:
    """The evaluation strategy for `mode` over an initialized process group."""
    if mode not in MODES:
        raise EdgezoError(f"unknown distributed mode {mode!r}; use one of {', '.join(MODES)}")
    if not dist.is_initialized():
        raise EdgezoError(f"distributed mode {mode!r} needs an initialized process group: launch with "
                          "`torchrun --nproc-per-node N -m edgezo tune ...` or call edgezo.distributed.init_from_env()")
    if mode == "probe":
        return ProbeParallel(group)
    parallel = DataParallel(group, rows_per_example, shard_batch=mode == "data")
    if mode == "data" and batch_size is not None and batch_size % parallel.world:
        raise EdgezoError(f"batch size {batch_size} does not split into {parallel.world} equal shards; "
                          f"use a multiple of {parallel.world}")
    return parallel
