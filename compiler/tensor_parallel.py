"""Starting N ranks for `kiln serve/generate --tensor-parallel-size N`.

One process per device on torch.distributed: NCCL between GPUs (cuda:RANK), gloo on the
CPU. Two ways in:
- **spawned**: the process that builds the engine is rank 0; it starts ranks 1..N-1 itself
  (spawned children, which rendezvous with it on a free loopback port);
- **launched**: under `torchrun` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR
  and MASTER_PORT), every process joins the group the launcher describes, on one machine
  or several (`--nnodes`, `--rdzv-endpoint`); rank 0 serves, the others follow.
Every rank compiles the same model with the same options and its own rank (the
shard.tensor_parallel pass), captures the same CUDA-graph buckets in the same order, then
runs the steps rank 0 sends (kiln.runtime.tensor_parallel).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one rank of a group."""
    return all(k in os.environ for k in LAUNCHER_ENV)


def check_size(size: int, device_type: str) -> None:
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size > 1 and device_type == "cuda" and torch.cuda.device_count() < size and not launched():
        raise ValueError(f"--tensor-parallel-size {size} needs {size} GPUs on this machine, "
                         f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES); or start "
                         f"the ranks with torchrun across machines")
    if launched() and int(os.environ["WORLD_SIZE"]) != size:
        raise ValueError(f"--tensor-parallel-size {size} but the launcher started "
                         f"WORLD_SIZE={os.environ['WORLD_SIZE']} processes: give the same number")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, size: int, device_type: str):
    """Joins the process group its environment describes (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT: from the launcher, or set by `spawn_followers`), points CUDA at this
    rank's device, and returns the gloo group that carries the steps."""
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if device_type == "cuda" else {}
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=size,
                                timeout=datetime.timedelta(minutes=30), **kw)
    return dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD


def rank_device(device_type: str) -> str:
    return f"cuda:{torch.cuda.current_device()}" if device_type == "cuda" else device_type


def spawn_followers(size: int, build_args: tuple) -> list:
    """Starts ranks 1..size-1 as processes of their own (`python -m kiln.tensor_parallel`;
    not multiprocessing children: the engine process that calls this is a daemon), which
    rendezvous with this process, rank 0, on a free loopback port. Each reads `build_args`
    from its stdin and exits when that pipe closes, that is when rank 0 ends."""
    import pickle
    import subprocess
    port = free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    payload = pickle.dumps(build_args)
    procs = []
    for rank in range(1, size):
        # the same CPU threads as rank 0 (--threads), so the ranks take equal time a step
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank),
                   OMP_NUM_THREADS=str(torch.get_num_threads()))
        p = subprocess.Popen([sys.executable, "-m", "kiln.tensor_parallel"], stdin=subprocess.PIPE,
                             env=env)
        p.stdin.write(len(payload).to_bytes(8, "little") + payload)
        p.stdin.flush()   # kept open: its end is the follower's signal to stop
        procs.append(p)
    return procs


def follower_main(rank: int, size: int, build_args: tuple) -> None:
    """A rank > 0: build the same runner as rank 0 for this rank, then run what it sends."""
    from kiln.runtime.tensor_parallel import follow

    from .serving import build_rank_runner
    try:
        runner, group, _ = build_rank_runner(rank, size, *build_args)
    except Exception as e:  # noqa: BLE001 - said here; rank 0 fails at its first collective
        print(f"kiln: rank {rank} failed to start: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    follow(runner, group)


def _follower_from_stdin() -> None:
    import pickle
    import threading
    stdin = sys.stdin.buffer
    n = int.from_bytes(stdin.read(8), "little")
    build_args = pickle.loads(stdin.read(n))

    def watch():   # rank 0 gone (its end of the pipe closed): nothing left to follow
        stdin.read()
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()
    follower_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), build_args)
    os._exit(0)


if __name__ == "__main__":
    _follower_from_stdin()
