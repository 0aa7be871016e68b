"""Routing consistency (moe-lrc): SRP and SCH against hand-computed cases and a plain reference
cache, and the `moefy analyze consistency` command."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moefy
from moefy.analysis import consistency as lrc
from moefy.analysis.routes import routing_masks, usage
from moefy.cli import app


def masks_from_sets(sets, E):
    """One block [1, L, E] from the expert sets of its tokens."""
    mask = torch.zeros(1, len(sets), E, dtype=torch.bool)
    for t, s in enumerate(sets):
        mask[0, t, list(s)] = True
    return mask


def random_topk(B, L, E, k, seed=0, sticky=0.0):
    """Top-k routing of random scores; `sticky` adds a per-block score offset (temporal consistency)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, E, generator=g) + sticky * torch.randn(B, 1, E, generator=g)
    return torch.zeros(B, L, E, dtype=torch.bool).scatter_(-1, scores.topk(k, -1).indices, True)


def test_srp_hand_computed():
    # One expert selected at tokens 0, 2, 3; m = 2: segments hold 1, 1, 2 selections.
    # alpha <= 1: TP 4, predicted 6, actual 4 -> F1 0.8; alpha = 2: TP 2, predicted 2 -> 4/6.
    mask = masks_from_sets([{0}, set(), {0}, {0}], 1)
    assert lrc.segment_histogram(mask, 2).tolist() == [[0, 2, 1]]
    r = lrc.srp(mask, 2)
    assert r["srp"] == pytest.approx(0.8) and r["threshold"] == 0 and r["size_ratio"] == pytest.approx(1.5)


def test_routing_constant_within_blocks_gives_srp_and_sch_one():
    g = torch.Generator().manual_seed(0)
    B, L, E, k = 3, 64, 12, 4
    per_block = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(B)])  # a different set per block
    mask = torch.zeros(B, E, dtype=torch.bool).scatter_(1, per_block, True)[:, None].expand(B, L, E).contiguous()
    for m in (1, 4, 16, 64):
        r = lrc.srp(mask, m)
        assert r["srp"] == pytest.approx(1.0) and r["size_ratio"] == pytest.approx(1.0) and r["threshold"] >= 1
        assert lrc.sch(mask, m, k) == 1.0
    assert lrc.sch(mask, None, k) == 1.0


def test_cache_of_every_expert_hits_everything():
    mask = random_topk(2, 50, 10, 3)
    for m in (None, 1, 4, 50):
        assert lrc.sch(mask, m, 10) == 1.0


def test_sch_hand_computed_lookahead_beats_lru():
    # 3 experts, cache of 2, tokens use {0}, {1}, {0}, {2}, {1}. The first two fill free slots.
    # At token 3, LRU evicts 1 (used at token 1) and misses it at token 4; the segment cache with
    # m = 2 sees that token 4 uses 1 and evicts 0 instead.
    mask = masks_from_sets([{0}, {1}, {0}, {2}, {1}], 3)
    assert lrc.sch(mask, None, 2) == pytest.approx(3 / 5)
    assert lrc.sch(mask, 1, 2) == pytest.approx(3 / 5)  # m = 1 sees no future: LRU
    assert lrc.sch(mask, 2, 2) == pytest.approx(4 / 5)


def test_cache_of_k_hits_the_overlap_of_consecutive_tokens():
    """With exactly k slots and k experts per token the cache holds the previous token's set,
    whatever the policy."""
    mask = random_topk(2, 40, 9, 3, seed=1)
    overlap = (mask[:, 1:] & mask[:, :-1]).sum() + 2 * 3  # + the first token of each block (free slots)
    for m in (None, 4, 16):
        assert lrc.sch(mask, m, 3) == pytest.approx(float(overlap) / float(mask.sum()))


def reference_cache(sets, capacity, lookahead):
    """The segment cache (or LRU) one token and one expert at a time, with Python sets."""
    cache, last, hits = set(), {}, 0
    for t, need in enumerate(sets):
        new = need - cache
        hits += len(need & cache) + min(len(new), max(capacity - len(cache), 0))
        cache |= need
        for e in need:
            last[e] = t
        future = lambda e: sum(e in s for s in sets[t + 1:t + lookahead]) if lookahead else 0  # noqa: E731
        while len(cache) > capacity:
            cache.remove(min(cache, key=lambda e: (e in need, future(e), last[e], e)))
    return hits


@pytest.mark.parametrize("capacity", [2, 4, 7])
@pytest.mark.parametrize("lookahead", [None, 3, 8])
def test_vectorised_cache_equals_reference_loop(capacity, lookahead):
    g = torch.Generator().manual_seed(capacity)
    # Variable k per token (as with dynamic-k), sometimes above the capacity.
    mask = (torch.rand(3, 30, 8, generator=g) < torch.rand(3, 30, 1, generator=g) * 0.6) | \
        (torch.rand(3, 1, 8, generator=g) < 0.3)
    hits = lrc.cache_hits(mask.numpy(), np.full(3, capacity), lookahead)
    for b in range(3):
        sets = [set(row.nonzero().flatten().tolist()) for row in mask[b]]
        assert hits[b] == reference_cache(sets, capacity, lookahead)


def test_consistent_routing_scores_above_its_shuffled_self():
    mask = random_topk(4, 128, 32, 8, sticky=2.0)
    result = lrc.analyse([mask, random_topk(4, 128, 32, 8, seed=3)], segments=(4, 16), ratios=(1, 2, 8))
    sticky, iid = result["layers"]
    for m in ("4", "16"):
        assert sticky["srp"][m]["srp"] > sticky["srp_shuffled"][m] + 0.1
        assert sticky["srp"][m]["srp"] > iid["srp"][m]["srp"] + 0.1
        assert iid["srp"][m]["srp"] == pytest.approx(iid["srp_shuffled"][m], abs=0.03)  # no order to lose
    assert sticky["sch"]["2"]["cache"] == 16 and sticky["sch"]["8"]["all_experts"]
    assert sticky["sch"]["8"]["m"]["16"] == 1.0
    assert sticky["sch"]["2"]["m"]["16"] >= sticky["sch"]["1"]["m"]["16"]
    assert set(result["model"]["sch_mean"]) == {"1", "2", "8"}
    assert "| 16 |" in lrc.markdown(result)


def test_routing_masks_are_what_the_model_selects(tiny_run, tokenizer):
    m = moefy.load(tiny_run)
    ids = torch.randint(5, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    masks = routing_masks(m, ids, batch_size=2)
    assert len(masks) == len(m.layers)
    for layer, mask, x in zip(m.layers, masks, m.layer_inputs(ids)):
        assert mask.shape == (3, 16, 8) and (mask.sum(-1) == layer.top_k).all()
        assert torch.equal(mask.flatten(0, 1), layer.route(x))
    u = usage(masks)
    assert u.shape == (2, 8) and torch.allclose(u.sum(1), torch.tensor([float(l.top_k) for l in m.layers]))


def test_cli(tiny_run, tmp_path):
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    base = ["analyze", "consistency", str(tiny_run), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "64"]
    r = CliRunner().invoke(app, [*base, "--m", "4", "--m", "16", "--rho", "1", "--rho", "2", "--top-k", "2",
                                 "--json", str(js), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    result = json.loads(js.read_text())
    assert result["segments"] == [4, 16] and result["tokens"] == 512 and len(result["layers"]) == 2
    assert result["layers"][0]["mean_k"] == 2 and result["layers"][0]["sch"]["1"]["cache"] == 2
    assert png.stat().st_size > 10_000
    r = CliRunner().invoke(app, [*base, "--json", str(js), "--plot", str(tmp_path / "d.png")])
    assert r.exit_code == 2 and "--overwrite" in r.output
    bad = tmp_path / "bad.json"
    r = CliRunner().invoke(app, [*base, "--m", "128", "--json", str(bad), "--plot", str(tmp_path / "bad.png")])
    assert r.exit_code == 2 and "segment lengths" in r.output and not bad.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
