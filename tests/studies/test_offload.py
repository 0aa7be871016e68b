import pytest
import torch

import moefy
from moefy.studies import offload, pregate
from moefy.config import MoEConfig
from moefy.studies.offload import LRUCache, replay

from conftest import TINY_MOE
# One layer's decode, 2 slots: the experts each step selects.
STEPS = [[0, 1], [0, 2], [1, 2], [0, 3]]


def test_lru_hand_counted():
    # [0,1]: 2 misses. [0,2]: 0 hits, 2 evicts 1. [1,2]: 2 hits, 1 evicts 0 (least recent).
    # [0,3]: both miss. Hits 0 + 1 + 1 + 0 = 2 of 8.
    cache = LRUCache(2)
    slots, loads = cache.access([0, 1])
    assert loads == [(0, 0), (1, 1)] and slots == [0, 1]
    for step in STEPS[1:]:
        cache.access(step)
    assert (cache.stats.requests, cache.stats.hits, cache.stats.loads) == (8, 2, 6)
    assert list(cache.slot) == [0, 3]


def test_lookahead_hand_counted():
    # Guesses for each step (right, half right, wrong, right), prefetched before the access:
    # [0,1] pre 0,1 -> 2 hits.  pre [0,3]: 0 touched, 3 evicts 1 -> {0,3}; [0,2]: 0 hits, 2 evicts 3
    # (its prefetch wasted) -> {0,2}.  pre [3,4]: 3, 4 evict 0, 2 -> {3,4}; [1,2]: 2 misses, evict
    # 3 and 4.  pre [0,3] -> {0,3}; [0,3]: 2 hits.  Hits 2 + 1 + 0 + 2 = 5; prefetch loads
    # 2 + 1 + 2 + 2 = 7, of which used 2 + 0 + 0 + 2 = 4; demand loads 3.
    trace = [list(zip(STEPS, [[0, 1], [0, 3], [3, 4], [0, 3]]))]
    (s,) = replay(trace, [2], lookahead=True)
    assert (s.requests, s.hits, s.prefetches, s.prefetch_used, s.misses) == (8, 5, 7, 4, 3)
    (plain,) = replay(trace, [2], lookahead=False)  # the same trace, guesses ignored: plain LRU
    assert (plain.hits, plain.loads) == (2, 6)
    (big,) = replay(trace, [4], lookahead=False)  # 4 slots hold all 4 experts: only cold misses
    assert (big.hits, big.loads) == (4, 4)


def test_prefetch_never_evicts_what_it_prefetches():
    cache = LRUCache(2)
    cache.access([0])
    cache.access([1])  # 0 is the least recent
    assert cache.prefetch([2, 0]) == [(2, 1)]  # 0 is kept (touched first), 1 makes room
    assert list(cache.slot) == [0, 2] and cache.stats.prefetches == 1


def test_cache_never_evicts_what_the_step_selected():
    cache = LRUCache(3)
    cache.access([0, 1, 2])
    slots, loads = cache.access([2, 5, 0])
    assert [e for e, _ in loads] == [5] and sorted(cache.slot) == [0, 2, 5]
    assert len(set(slots)) == 3
    with pytest.raises(ValueError):
        cache.access([1, 2, 3, 4])


@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_decode_is_exact_and_counts_match_replay(tiny_llama_moe, tokenizer, tmp_path, prefetch):
    m = tiny_llama_moe
    prompt = torch.randint(5, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    expected, _ = offload.greedy(m.model, prompt, 10)
    calib = moefy.pipeline.data.blocks("pydoc", tokenizer, 32, max_tokens=1024)
    predictors = [None] + [r for r, _ in pregate.train_routers(m, pregate.dense_inputs(m, calib),
                                                                MoEConfig(**TINY_MOE))]
    store = offload.ExpertStore(m.layers, tmp_path)
    try:
        run = offload.run(m, store, prompt, 10, 1.0, predictors, prefetch)
    finally:
        store.close()
    assert run.tokens == expected  # same greedy tokens as the resident model
    assert len(run.step_s) == 9 and all(len(t) == 9 for t in run.trace)
    replayed = replay(run.trace, run.capacity, lookahead=prefetch)
    assert [s.astuple() for s in replayed] == [s.astuple() for s in run.stats]
    assert all(guess is None for _, guess in run.trace[0]) and all(g is not None for _, g in run.trace[1])
    assert all(m.layers) and not any(isinstance(mod, offload.OffloadedFFN) for mod in m.model.modules())


def test_pregated_model_lookahead_is_exact(tiny_llama_pregated, tmp_path):
    m = tiny_llama_pregated
    prompt = torch.randint(5, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    expected, _ = offload.greedy(m.model, prompt, 8)
    store = offload.ExpertStore(m.layers, tmp_path)
    try:
        run = offload.run(m, store, prompt, 8, 1.0, [None, None], prefetch=True)
    finally:
        store.close()
    assert run.tokens == expected
    assert all(selected == guess for selected, guess in run.trace[1])
    assert run.stats[1].hit_rate == 1.0 and run.stats[1].misses == 0
