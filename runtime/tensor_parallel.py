"""Tensor-parallel serving: rank 0 schedules, every rank runs the step.

Each rank holds its shard of the compiled serving graph (passes/shard.py) and its own KV
cache (its heads). The engine, scheduler and sampler live on rank 0 only; each step, rank
0's `LeaderRunner` sends the step's batch to the other ranks before running it, and
`follow` on those ranks runs the same batch. The graphs' collectives then meet in the same
order on every rank, CUDA-graph replays included: the batch alone decides which bucket a
step runs in, and every rank captured the same buckets in the same order at start-up.

The batch is host data (the scheduler's output); it travels over a gloo group of its own,
apart from the collectives of the model (NCCL on GPUs). The sampled tokens of a step exist
on rank 0 only, so the next batch cannot name them as pending device values: the leader
does not accept pending inputs, and the engine schedules synchronously.
"""
from __future__ import annotations

import torch.distributed as dist

STOP = None   # the message that ends `follow`


class LeaderRunner:
    """Rank 0's runner: `runner` (a PagedModelRunner) whose every step is sent to the other
    ranks of `group` first. Everything else is the wrapped runner's."""
    accepts_pending_inputs = False

    def __init__(self, runner, group, world_size: int, followers=()):
        self.runner, self.group, self.world_size = runner, group, world_size
        self.followers = list(followers)   # processes rank 0 started (subprocess.Popen)
        self.closed = False

    def execute(self, batch):
        if batch.pending is not None:
            raise ValueError("tensor parallelism needs synchronous scheduling: the batch names "
                             "tokens on rank 0's device (EngineConfig.async_scheduling=False)")
        dist.broadcast_object_list([batch], src=0, group=self.group)
        return self.runner.execute(batch)

    def close(self) -> None:
        """Ends the other ranks' `follow` loops (they exit after it)."""
        if not self.closed:
            self.closed = True
            dist.broadcast_object_list([STOP], src=0, group=self.group)
            for p in self.followers:
                p.stdin.close()
                p.wait(timeout=60)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def follow(runner, group) -> int:
    """Runs on ranks > 0: every batch rank 0 sends, until it sends STOP or goes away.
    Returns the number of steps run."""
    steps = 0
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except (RuntimeError, ConnectionError):   # rank 0 exited without STOP
            return steps
        if box[0] is STOP:
            return steps
        runner.execute(box[0])
        steps += 1
