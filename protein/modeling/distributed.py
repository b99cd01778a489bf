"""Data-parallel training under torchrun: who this process is, the process group's lifetime,
the few collectives training needs, and the launcher behind `protein train --nproc N`.

One process per device. torchrun (`torch.distributed.run`) starts the processes and sets
RANK, LOCAL_RANK and WORLD_SIZE; without them this process is the only rank and every helper
here is a no-op, so single-process code paths call them unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# Set by the launcher: where rank 0 writes the run's JSON result for the parent to read.
RESULT_FILE_ENV = "PROTEIN_DDP_RESULT"
# Seconds a collective (or the initial rendezvous) may wait for a peer before failing: a rank
# that died or hangs fails the run instead of blocking the others forever.
TIMEOUT_ENV = "PROTEIN_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Rank:
    """This process's place in the job, from torchrun's environment (rank 0 of 1 without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Rank()
    return Rank(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def timeout_s() -> int:
    return int(os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S)))


def rank_device(device: torch.device, rank: Rank) -> torch.device:
    """One process per GPU: a CUDA rank is pinned to the card of its LOCAL_RANK."""
    if device.type == "cuda" and rank.distributed:
        return torch.device("cuda", rank.local_rank)
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Rank]:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) for the duration of the block;
    outside torchrun, yield rank 0 of 1 and do nothing."""
    rank = current()
    if not rank.distributed or active():
        yield rank
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank.local_rank)
    torch.distributed.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s()))
    log.info("rank %d/%d joined (%s, local rank %d)", rank.rank, rank.world_size, backend, rank.local_rank)
    try:
        yield rank
    finally:
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def resolved(device: torch.device) -> torch.device:
    """The device with its index: `cuda` means the current CUDA device, and tensors made there
    report `cuda:0` (found on the first real GPU run: every step was refused as cuda:0 != cuda)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def require_on(device: torch.device, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse, with the tensor's name, any tensor that is not on `device`, the device the process
    group communicates on (the rank's GPU under NCCL, which rejects host tensors; the CPU under
    gloo). Checked on one process too, so a CPU test catches what would crash only on NCCL."""
    expected = resolved(device)
    for name, tensor in tensors.items():
        if resolved(tensor.device) != expected:
            raise ValueError(f"{what}: tensor {name!r} lives on {tensor.device} but the ranks communicate on "
                             f"{device}; create it on the model's device")


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over ranks, in place (the tensor itself on one rank)."""
    require_on(device, {"sum": tensor}, "all_reduce_sum")
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def sync_from_main(module: torch.nn.Module, device: torch.device) -> None:
    """Copy rank 0's parameters and buffers to every rank: BatchNorm running statistics (and
    an EMA of them) drift apart because each rank normalises its own shard; evaluation and the
    checkpoint use rank 0's."""
    state = module.state_dict()
    require_on(device, state, f"broadcast of {type(module).__name__}")
    if active():
        for tensor in state.values():
            torch.distributed.broadcast(tensor, src=0)


def shard(indices: np.ndarray, rank: Rank) -> np.ndarray:
    """This rank's rows of `indices`: every world_size-th one, starting at its rank."""
    return indices[rank.rank :: rank.world_size]


def unshard(parts: Sequence[np.ndarray], total: int) -> np.ndarray:
    """Inverse of `shard`: interleave the ranks' rows back into the original order."""
    out = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part[: len(range(r, total, len(parts)))]
    return out


def gather_rows(local: np.ndarray, total: int, device: torch.device) -> np.ndarray:
    """Every rank's `shard` of a (total, ...) float array, reassembled on every rank."""
    if not active():
        return local
    world = torch.distributed.get_world_size()
    longest = -(-total // world)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return unshard([p.cpu().numpy() for p in parts], total).astype(local.dtype)


# --- the launcher --------------------------------------------------------------------------------
def torchrun_command(nproc: int, module_argv: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run` on this host (standalone rendezvous), no restarts:
    a failed rank fails the run; a rerun with the same --run-id resumes from the checkpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "--monitor-interval=1", "-m", "protein.cli", *module_argv]


def launch(nproc: int, module_argv: Sequence[str]) -> tuple[int, dict[str, Any] | None]:
    """Run `protein <module_argv>` as nproc ranks and wait: (exit code, rank 0's JSON result, or
    rank 0's own error as {"error", "exit_code"} when that is why the run failed, or None when a
    rank died without one)."""
    with tempfile.TemporaryDirectory(prefix="protein-ddp-") as tmp:
        result_path = Path(tmp) / "result.json"
        env = {**os.environ, RESULT_FILE_ENV: str(result_path), "OMP_NUM_THREADS":
               os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
        command = torchrun_command(nproc, module_argv)
        log.info("launching %d ranks: %s", nproc, " ".join(command))
        code = wait_stopping_on_exit(subprocess.Popen(command, env=env))
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        if code != 0 and (result is None or "error" not in result):
            # Rank 0 said nothing of why: another rank's own error (an out-of-memory on rank 1 stops
            # the run as surely as on rank 0), else None: a rank died without one (killed).
            return code or 1, rank_error(result_path)
        return code, result


# Seconds torchrun gets to stop its ranks after SIGTERM before it is killed: the ranks finish the
# collective they are in (or time out of it) and exit; a checkpoint write in flight completes.
LAUNCHER_STOP_GRACE_S = 30.0
# How often a rank checks that its launcher still lives.
LAUNCHER_CHECK_S = 1.0


def wait_stopping_on_exit(process: subprocess.Popen[bytes], grace_s: float = LAUNCHER_STOP_GRACE_S) -> int:
    """torchrun's exit code. When waiting is interrupted (the task's timeout, the worker's SIGTERM
    when the run is cancelled), torchrun is asked to stop its ranks (SIGTERM) and killed only after
    ``grace_s``. subprocess.run killed it at once: torchrun starts each rank in a session of its
    own, so the ranks outlived it, held every GPU and trained on, and the retry's ranks failed out
    of memory or lost the checkpoint to them."""
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise


def exit_with_launcher(check_s: float = LAUNCHER_CHECK_S) -> None:
    """A rank ends itself when its launcher is gone (torchrun killed without a chance to stop it:
    the worker's SIGKILL after its grace period, the out-of-memory killer). A rank runs in a session
    of its own, so nothing else reaches it: it would train on, unowned, on the GPU the run's
    re-dispatch needs. Polls the parent pid from a daemon thread."""
    import threading
    import time

    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(check_s)
        log.error("rank %d: its launcher (pid %d) is gone; stopping", current().rank, launcher)
        os._exit(1)

    threading.Thread(target=watch, name="protein-launcher-watch", daemon=True).start()


def write_result(result: dict[str, Any]) -> None:
    """Rank 0 hands the run's result to the launcher (no-op outside a launched run)."""
    path = os.environ.get(RESULT_FILE_ENV)
    if path and current().is_main:
        Path(path).write_text(json.dumps(result, default=str))


RANK_ERROR_SUFFIX = ".rank"


def rank_error_path(result_path: Path, rank: int) -> Path:
    """Where a rank other than 0 leaves its error, beside the result file rank 0 writes."""
    return result_path.with_name(f"{result_path.name}{RANK_ERROR_SUFFIX}{rank}")


def write_error(message: str, exit_code: int, kind: str | None = None) -> None:
    """Any rank hands the error it stopped on to the launcher: rank 0 as its result, another rank
    beside it (no-op outside a launched run). ``kind``: the error's class in protein.errors, so the
    launcher raises it as that (a store outage is retried, an out-of-memory is not)."""
    path = os.environ.get(RESULT_FILE_ENV)
    if not path:
        return
    rank = current()
    target = Path(path) if rank.is_main else rank_error_path(Path(path), rank.rank)
    target.write_text(json.dumps({"error": message, "exit_code": exit_code, "rank": rank.rank, "type": kind}))


def rank_error(result_path: Path) -> dict[str, Any] | None:
    """The error of the lowest rank other than 0 that wrote one (write_error), or None."""
    def rank_of(path: Path) -> int:
        number = path.name.removeprefix(f"{result_path.name}{RANK_ERROR_SUFFIX}")
        return int(number) if number.isdigit() else 1 << 30

    for path in sorted(result_path.parent.glob(f"{result_path.name}{RANK_ERROR_SUFFIX}*"), key=rank_of):
        try:
            error = json.loads(path.read_text())
        except (OSError, ValueError):  # a rank killed while writing it: no error to hand on
            continue
        if isinstance(error, dict) and "error" in error:
            return error
    return None
