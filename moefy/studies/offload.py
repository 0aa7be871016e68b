"""Expert offloading on the CPU: routed experts live in a file (the slow tier), each layer keeps a
cache of C expert slots in memory (the fast tier), and greedy decode loads whatever it misses.

Policies: LRU, and LRU + lookahead, which loads the experts the next layer's pre-gated router
picks from this layer's input while this layer computes (Pre-gated MoE, Hwang et al. 2024): on a
pre-gated model (`convert --router-input previous`) that pick *is* the next layer's selection; on
a per-layer-router model it is a prediction by separately trained pre-gated routers (pregate.py).

Reads bypass the OS page cache: the file is opened with O_DIRECT (one aligned read per expert), so
every miss is a real read from the device. Prefill and the shared neurons stay in memory; only the
decode steps' routed experts go through the caches.

# D hidden, n neurons per expert, E routed experts, K selected per token, C cache slots per layer
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import os
import statistics
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moefy.model import MoEModel, cache_kwarg, output_cache
from moefy.modeling.router_mlp import MLPRouter
from moefy.modeling.moe_layer import MoEFFN
from moefy.modeling.compiled import _kernels

PAGE = 4096  # O_DIRECT alignment of offsets, sizes and buffers (bytes)


# ----------------------------------------------------------------------------------------------
# The cache policy (pure bookkeeping: which expert sits in which slot).


@dataclass
class CacheStats:
    requests: int = 0       # experts the router asked for (demand accesses)
    hits: int = 0           # ... already in the cache (prefetched ones included)
    prefetches: int = 0     # experts loaded ahead by the lookahead
    prefetch_used: int = 0  # ... that a demand access then hit before they were evicted

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.requests, 1)

    @property
    def loads(self) -> int:
        """Experts read from the slow tier: demand misses plus prefetches."""
        return self.misses + self.prefetches

    def add(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self):
        return self.requests, self.hits, self.prefetches, self.prefetch_used

    def to_dict(self) -> dict:
        return {"requests": self.requests, "hits": self.hits, "hit_rate": self.hit_rate, "misses": self.misses,
                "prefetches": self.prefetches, "prefetch_used": self.prefetch_used, "loads": self.loads}


class LRUCache:
    """At most `capacity` experts of one layer in slots 0..capacity-1, least recently used
    evicted first. `access` and `prefetch` return the (expert, slot) pairs to load."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.slot: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recent first
        self.free = list(range(capacity - 1, -1, -1))
        self.ahead: set[int] = set()  # prefetched, not yet requested
        self.stats = CacheStats()

    def _insert(self, expert: int) -> int:
        if not self.free:
            old, slot = self.slot.popitem(last=False)
            self.ahead.discard(old)
            self.free.append(slot)
        self.slot[expert] = slot = self.free.pop()
        return slot

    def prefetch(self, experts: list[int]) -> list[tuple[int, int]]:
        """Make `experts` (at most `capacity`) the most recent entries, cached ones touched
        first so that loading the others never evicts one of them; returns the loads."""
        for e in experts:
            if e in self.slot:
                self.slot.move_to_end(e)
        loads = [(e, self._insert(e)) for e in experts if e not in self.slot]
        self.ahead.update(e for e, _ in loads)
        self.stats.prefetches += len(loads)
        return loads

    def access(self, experts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """A token's selected experts (at most `capacity`): hits are touched first, then misses
        take the least recent slots, so no selected expert is evicted. Returns every expert's slot
        (in the order given) and the loads."""
        if len(experts) > self.capacity:
            raise ValueError(f"{len(experts)} experts requested from a cache of {self.capacity}")
        hit = [e for e in experts if e in self.slot]
        for e in hit:
            self.slot.move_to_end(e)
            if e in self.ahead:
                self.ahead.remove(e)
                self.stats.prefetch_used += 1
        loads = [(e, self._insert(e)) for e in experts if e not in self.slot]
        self.stats.requests += len(experts)
        self.stats.hits += len(hit)
        return [self.slot[e] for e in experts], loads


def replay(trace: list[list[tuple[list[int], list[int] | None]]], capacity: list[int],
           lookahead: bool) -> list[CacheStats]:
    """One cache per layer over a recorded decode: trace[l][t] = (the experts layer l used at
    step t, the lookahead's guess of them or None). With `lookahead`, each guess is prefetched
    before its step's access, as OffloadedFFN does."""
    stats = []
    for steps, c in zip(trace, capacity):
        cache = LRUCache(c)
        for experts, guess in steps:
            if lookahead and guess is not None:
                cache.prefetch(guess)
            cache.access(experts)
        stats.append(cache.stats)
    return stats


# ----------------------------------------------------------------------------------------------
# The slow tier: one file, read with O_DIRECT.


class ExpertStore:
    """Every layer's routed experts in one file: expert (l, e) is [w_in; w_up; w_out] rows
    ([3, n, D] fp32, w_up absent for non-gated FFNs) padded to whole 4 KiB pages. Opened with
    O_DIRECT where the file system allows it (`direct` says which), so reads bypass the page cache."""

    def __init__(self, layers: list[MoEFFN], folder: str | os.PathLike):
        E, n, D = layers[0].w_in.shape
        self.mats = 3 if layers[0].w_up is not None else 2
        self.n, self.D, self.E = n, D, E
        self.nbytes = self.mats * n * D * 4
        self.stride = -(-self.nbytes // PAGE) * PAGE  # bytes per expert on file
        fd, name = tempfile.mkstemp(prefix="moefy-experts-", suffix=".bin", dir=folder)
        self.path = Path(name)
        with os.fdopen(fd, "wb") as f:
            pad = bytes(self.stride - self.nbytes)
            for layer in layers:
                w = torch.stack([m for m in (layer.w_in, layer.w_up, layer.w_out) if m is not None], 1)  # [E, 3, n, D]
                for e in range(E):
                    f.write(w[e].contiguous().numpy().tobytes())
                    f.write(pad)
            f.flush()
            os.fsync(f.fileno())
        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
        try:
            self.fd, self.direct = os.open(self.path, flags), bool(flags & getattr(os, "O_DIRECT", 0))
        except OSError:  # e.g. tmpfs: no O_DIRECT; drop the file's pages instead (see read)
            self.fd, self.direct = os.open(self.path, os.O_RDONLY), False

    def buffer(self) -> mmap.mmap:
        """A page-aligned buffer for one expert (anonymous mmap)."""
        return mmap.mmap(-1, self.stride)

    def read(self, layer: int, expert: int, buf: mmap.mmap) -> torch.Tensor:
        """Expert (layer, expert) as [mats, n, D], a view of `buf`."""
        offset = (layer * self.E + expert) * self.stride
        if not self.direct:
            os.posix_fadvise(self.fd, offset, self.stride, os.POSIX_FADV_DONTNEED)
        got = os.preadv(self.fd, [buf], offset)
        if got != self.stride:
            raise OSError(f"short read from {self.path}: {got} of {self.stride} bytes")
        return torch.frombuffer(buf, dtype=torch.float32, count=self.nbytes // 4).view(self.mats, self.n, self.D)

    def close(self):
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The fast tier: an offloaded layer computes from its cache slots.


class OffloadedFFN(nn.Module):
    """Stands in for an MoEFFN during decode: routes with the layer's own router, loads missing
    experts from the store into its C slots (LRU), and computes the selected experts from the
    slots. More than one token (prefill) runs the resident layer.

    `predictor` is the next layer's pre-gated router (its own router when the next layer is
    pre-gated: then the pick is exact and the next layer does not route again). With `prefetch`,
    its pick for this token is loaded into the next layer's cache on a background thread while
    this layer computes; without, the pick is only recorded (the trace that `replay` reads)."""

    def __init__(self, layer: MoEFFN, index: int, store: ExpertStore, capacity: int):
        super().__init__()
        self.layer, self.index, self.store = layer, index, store
        self.cache = LRUCache(capacity)
        self.slots = MoEFFN({**layer.spec, "num_experts": capacity, "router_input": "own"}).requires_grad_(False)
        for name in ("shared_in", "shared_up", "shared_b_in", "shared_out"):  # shared with the resident layer
            if getattr(layer, name) is not None:
                setattr(self.slots, name, getattr(layer, name))
        self.slots.router = nn.Identity()  # never used: the kernels get slot indices directly
        self._bufs = (store.buffer(), store.buffer())  # demand reads, prefetch reads
        self.next: OffloadedFFN | None = None
        self.predictor: MLPRouter | None = None
        self.prefetch = False
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending: concurrent.futures.Future | None = None  # the prefetch into this layer
        self.preselected: list[int] | None = None  # this token's experts, picked by the previous layer (pre-gated)
        self.predicted: list[int] | None = None  # the previous layer's guess of this token's experts
        self.trace: list[tuple[list[int], list[int] | None]] = []  # per decode step: (selected, predicted)

    def _load(self, loads: list[tuple[int, int]], buf):
        dst = [t for t in (self.slots.w_in, self.slots.w_up, self.slots.w_out) if t is not None]
        for e, s in loads:
            for d, w in zip(dst, self.store.read(self.index, e, buf)):
                d[s].copy_(w)

    def _prefetch(self, experts: list[int]):
        self._load(self.cache.prefetch(experts), self._bufs[1])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        if x.shape[0] > 1:
            return self.layer(x).reshape(shape)  # prefill: resident (it feeds a pre-gated next layer itself)
        nxt = self.next
        if self.predictor is not None:  # the next layer's experts, one layer ahead
            guess = _top_k(self.predictor.logits(x)[0], nxt.layer.top_k)
            nxt.predicted = guess
            if nxt.layer.router_input == "previous":
                nxt.preselected = guess
            if self.prefetch:
                nxt.pending = self.pool.submit(nxt._prefetch, guess)
        experts = self.preselected if self.preselected is not None else self._route(x)
        if self.pending is not None:  # the cache is the prefetch thread's until its loads are in
            self.pending.result()
        slots, loads = self.cache.access(experts)
        self._load(loads, self._bufs[0])
        self.trace.append((experts, self.predicted))
        self.preselected = self.predicted = self.pending = None
        self.layer.tokens_seen += 1
        self.layer.experts_selected += len(experts)
        y = self._experts(x, torch.tensor(slots).view(1, -1))
        return (y if self.layer.b_out is None else y + self.layer.b_out).reshape(shape)

    def _route(self, x) -> list[int]:
        """The layer's own choice, on the path its forward takes (the kernels' router and top-k)."""
        picked = self.layer.routing_step(x)  # [1, K] indices, or a [1, E] mask on the torch paths
        return sorted((picked[0].nonzero()[:, 0] if picked.dtype == torch.bool else picked[0]).tolist())

    def _experts(self, x, slots):
        kern = _kernels()
        args = self.slots._kernel_args(kern) if kern is not None else None
        if args is not None:
            return kern.experts(args, x.contiguous(), slots)  # routed experts + shared neurons
        y = self.slots._experts_gather(x, slots[0])
        return y if self.slots.shared_in is None else y + self.slots._shared(x)


def _top_k(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(scores.topk(k).indices.tolist())


# ----------------------------------------------------------------------------------------------
# Runs.


@dataclass
class OffloadRun:
    policy: str                 # "lru" or "lru+lookahead"
    cache_factor: float         # cache slots per layer / the layer's top-k
    capacity: list[int]         # slots per layer
    tokens: list[int]           # the greedy continuation
    step_s: list[float]         # wall-clock per decode step (seconds)
    stats: list[CacheStats]     # per layer
    trace: list[list[tuple]] = field(default_factory=list)  # per layer, per step: (selected, predicted)

    def summary(self, store: ExpertStore) -> dict:
        total = _sum(self.stats)
        steps = len(self.step_s)
        return {"policy": self.policy, "cache_factor": self.cache_factor, "capacity_mean": statistics.mean(self.capacity),
                **total.to_dict(), "hit_rate_per_layer": [s.hit_rate for s in self.stats],
                "tok_s": steps / sum(self.step_s), "ms_per_token_median": 1e3 * statistics.median(self.step_s),
                "mb_read_per_token": total.loads * store.stride / steps / 2**20}


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int, after_prefill=None) -> tuple[list[int], list[float]]:
    """Greedy decode of one sequence with the KV cache: the new tokens and each decode step's
    wall-clock (s). `after_prefill`: a callable returning a context manager the decode runs in."""
    out, name = model(input_ids=prompt, use_cache=True), cache_kwarg(model)
    past, tok = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, times = [int(tok)], []
    with after_prefill() if after_prefill is not None else contextlib.nullcontext():
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(input_ids=tok, use_cache=True, **{name: past})
            past, tok = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
            tokens.append(int(tok))
    return tokens, times


def capacities(m: MoEModel, cache_factor: float) -> list[int]:
    """Cache slots per layer: cache_factor x the layer's top-k, at least top-k, at most E."""
    return [min(l.spec["num_experts"], max(l.top_k, round(cache_factor * l.top_k))) for l in m.layers]


@torch.no_grad()
def run(m: MoEModel, store: ExpertStore, prompt: torch.Tensor, new_tokens: int, cache_factor: float,
        predictors: list[MLPRouter | None], prefetch: bool) -> OffloadRun:
    """Greedy decode with every MoE layer offloaded to `store` behind caches of
    capacities(m, cache_factor) slots. predictors[l] guesses layer l's experts from layer l-1's
    input (None: use layer l's own router if it is pre-gated, else no guess); with `prefetch`
    the guesses are loaded ahead (LRU + lookahead), else only recorded (LRU)."""
    layers = m.layers
    names = [name for name, mod in m.model.named_modules() if isinstance(mod, MoEFFN)]
    capacity = capacities(m, cache_factor)
    wrappers = [OffloadedFFN(layer, i, store, c) for i, (layer, c) in enumerate(zip(layers, capacity))]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    for w, nxt, p in zip(wrappers, wrappers[1:], predictors[1:]):
        w.next, w.pool, w.prefetch = nxt, pool, prefetch
        w.predictor = p if p is not None else (nxt.layer.router if nxt.layer.router_input == "previous" else None)
    for name, w in zip(names, wrappers):
        m.model.set_submodule(name, w)
    try:
        tokens, times = greedy(m.model, prompt, new_tokens)
    finally:
        for name, layer in zip(names, layers):
            m.model.set_submodule(name, layer)
        pool.shutdown()
    return OffloadRun("lru+lookahead" if prefetch else "lru", cache_factor, capacity, tokens, times,
                      [w.cache.stats for w in wrappers], [w.trace for w in wrappers])


def read_speed(store: ExpertStore, reads: int = 256, seed: int = 0) -> dict:
    """Cold reads of random experts from the store: microseconds per expert and MB/s."""
    g = torch.Generator().manual_seed(seed)
    layers = store.path.stat().st_size // (store.E * store.stride)
    picks = torch.randint(layers * store.E, (reads,), generator=g).tolist()
    buf = store.buffer()
    start = time.perf_counter()
    for p in picks:
        store.read(p // store.E, p % store.E, buf)
    s = time.perf_counter() - start
    return {"reads": reads, "us_per_expert": 1e6 * s / reads, "mb_s": reads * store.stride / s / 2**20,
            "expert_bytes": store.stride, "o_direct": store.direct}


def analyse(m: MoEModel, prompts: torch.Tensor, new_tokens: int, factors: list[float],
            predictors: list[MLPRouter | None], folder: str | os.PathLike) -> dict:
    """Greedy decode of each prompt [P, L] resident and offloaded (LRU, LRU + lookahead) at
    every cache factor: hit rates, slow-tier reads and tokens/s. Each offloaded run must give the
    resident run's tokens; the LRU run's recorded guesses, replayed with lookahead, must give
    the lookahead run's counts (`replay_matches`). Every offloaded run must give the same tokens
    (the same products in the same order, whatever slots the experts sit in); they may part from
    the resident decode after a while, as the resident kernels sum the experts in another order
    and a rounding difference can flip a near-tie (`resident_agreement`: the share of steps
    before the first differing token)."""
    store = ExpertStore(m.layers, folder)
    try:
        speed = read_speed(store)
        resident = [greedy(m.model, p[None], new_tokens) for p in prompts]
        result = {"store": speed, "prompts": len(prompts), "prompt_len": prompts.shape[1], "new_tokens": new_tokens,
                  "top_k_mean": statistics.mean(l.top_k for l in m.layers), "experts": m.layers[0].spec["num_experts"],
                  "pregated": m.layers[-1].router_input == "previous",
                  "resident_tok_s": sum(len(t) for _, t in resident) / sum(sum(t) for _, t in resident), "rows": []}
        reference = None
        for factor in factors:
            runs = {}
            for prefetch in (False, True):
                rs = [run(m, store, p[None], new_tokens, factor, predictors, prefetch) for p in prompts]
                reference = reference or [r.tokens for r in rs]
                if [r.tokens for r in rs] != reference:
                    raise RuntimeError("offloaded decodes with different caches gave different tokens")
                runs[prefetch] = rs
                merged = OffloadRun(rs[0].policy, factor, rs[0].capacity, [], [t for r in rs for t in r.step_s],
                                    [_sum(s) for s in zip(*(r.stats for r in rs))])
                result["rows"].append(merged.summary(store))
            replayed = [_sum(s) for s in zip(*(replay(r.trace, r.capacity, True) for r in runs[False]))]
            result["rows"][-1]["replay_matches"] = [s.astuple() for s in replayed] == [
                _sum(s).astuple() for s in zip(*(r.stats for r in runs[True]))]
            result["rows"][-1]["guess_recall"] = _guess_recall(runs[False])
        result["resident_agreement"] = statistics.mean(_agreement(a, b) for a, (b, _) in zip(reference, resident))
        return result
    finally:
        store.close()


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of the tokens before the first difference."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


def _sum(stats) -> CacheStats:
    total = CacheStats()
    for s in stats:
        total = total.add(s)
    return total


def _guess_recall(runs: list[OffloadRun]) -> float:
    """Share of the selected experts that the lookahead guessed (layers with a guess)."""
    hit = total = 0
    for r in runs:
        for steps in r.trace:
            for selected, guess in steps:
                if guess is not None:
                    hit += len(set(selected) & set(guess))
                    total += len(selected)
    return hit / max(total, 1)
