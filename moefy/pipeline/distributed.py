"""Data-parallel calibration with torch.distributed (under torchrun, gloo backend, CPU).

    torchrun --nproc-per-node 2 -m moefy convert --model ... --out ...

Each rank loads the model, profiles a contiguous share of the calibration batches, then the
streaming sums of every layer's FFNStats are all-reduced and the kept router-training inputs
all-gathered in rank order. Every rank then holds what one process would have computed over all
batches: the counts (tokens, activation markers, co-activation) exactly, the fp64 activation
sums up to the order of addition, the router inputs row for row. Grouping and router training
depend only on those counts and inputs (and the seed), so every rank builds the same model; only
rank 0 writes it. A user's own script works the same way: moefy.convert() shards its calibration
whenever a process group is initialised.

# N tokens, D hidden, I ffn width
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from moefy.errors import ConfigError
from moefy.pipeline.stats import FFNStats

SUMS = ("abs_sum", "sum", "sq_sum", "marked", "coactivation")  # FFNStats fields added over batches


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


@contextlib.contextmanager
def session(backend: str = "gloo"):
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1) for the
    duration of the block. Does nothing in a plain process or when a group exists already."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard(blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's contiguous share of the calibration blocks [B, L], cut at batch boundaries:
    each rank runs exactly the batches one process would run (same shapes, same arithmetic)."""
    rank, size = world()
    if size == 1:
        return blocks
    batches = -(-len(blocks) // batch_size)
    if batches < size:
        raise ConfigError(f"{batches} calibration batch(es) of {batch_size} blocks cannot be shared by {size} "
                          "processes; give more calibration tokens or start fewer processes")
    start, end = (round(r * batches / size) * batch_size for r in (rank, rank + 1))
    return blocks[start:end]


def reduce(stats: list[FFNStats]) -> list[FFNStats]:
    """Combine every rank's per-layer statistics in place (no-op in one process): sums
    all-reduced, the first `keep_inputs` FFN inputs over all ranks gathered in rank order."""
    if world()[1] == 1:
        return stats
    for st in stats:
        tokens = torch.tensor([st.tokens])
        dist.all_reduce(tokens)
        st.tokens = int(tokens)
        for name in SUMS:
            if getattr(st, name) is not None:
                dist.all_reduce(getattr(st, name))
        st.inputs = _gather_first_rows(st.inputs, st.keep_inputs)
    return stats


def _gather_first_rows(x: torch.Tensor, keep: int) -> torch.Tensor:
    """The first `keep` rows of the ranks' x [N_r, D] stacked in rank order, on every rank;
    a rank sends only the rows that are still needed after the ranks before it."""
    rank, size = world()
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]]))
    takes, before = [], 0
    for c in counts:
        takes.append(max(0, min(int(c), keep - before)))
        before += takes[-1]
    width = torch.tensor([x.shape[-1] if x.dim() == 2 else 0])
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    rows = max(takes)
    padded = torch.zeros(rows, int(width), dtype=torch.float32)  # [max take, D]
    padded[: takes[rank]] = x[: takes[rank]]
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:t] for p, t in zip(parts, takes)])  # [sum takes, D]
