import pytest
import torch

import moefy
from moefy.pipeline.budget import allocate, error_curve
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError

from conftest import tiny_model
from test_moe_layer import D, make_moe

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)


@torch.no_grad()
def test_error_curve_matches_direct_computation():
    _, moe = make_moe(shared=6, E=7)
    x = torch.randn(40, D)
    curve = error_curve(moe, x, chunk=16)
    E = moe.spec["num_experts"]
    assert len(curve) == E + 1 and curve[-1] == pytest.approx(0.0, abs=1e-6)
    moe.all_experts = True
    dense = moe(x)
    moe.all_experts = False
    order = moe.router(x).argsort(-1, descending=True)
    for k in (0, 2, 5):
        mask = torch.zeros(len(x), E, dtype=torch.bool)
        if k:
            mask.scatter_(1, order[:, :k], True)
        err = (moe.forward_reference(x, mask) - dense).square().sum(-1).mean()
        assert curve[k] == pytest.approx(float(err), rel=1e-4, abs=1e-5)


def test_allocate_spends_where_error_falls_most():
    flat = [10.0, 9.0, 8.0, 7.0, 6.0]  # little to gain
    steep = [10.0, 4.0, 1.0, 0.5, 0.0]  # much to gain early
    ks = allocate([flat, steep], [1.0, 1.0], [0.0, 0.0], budget=5)
    assert ks == [3, 2]  # total error 7 + 1: the optimum among [1, 4] (9), [2, 3] (8.5), [3, 2], [4, 1] (10)
    assert allocate([flat, steep], [1.0, 1.0], [0.0, 0.0], budget=100) == [4, 4]  # capped at every expert
    with pytest.raises(ConfigError, match="raise the active share"):
        allocate([flat, steep], [1.0, 1.0], [3.0, 3.0], budget=7)


def test_sensitivity_budget_end_to_end(tokenizer):
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    cfg = MoEConfig(num_experts=8, shared=0.0, router_steps=30, router_hidden=16, active=0.5, budget="sensitivity")
    m = moefy.convert(tiny_model("llama"), moe=cfg, data=DATA, tokenizer=tokenizer)
    assert all(len(r["error_curve"]) == 9 for r in m.record["layers"])
    layers = m.layers
    total = sum(l.flops_per_token(l.top_k) for l in layers)
    assert total <= 0.5 * sum(l.dense_flops_per_token() for l in layers) + 1e-6
    assert [r["top_k"] for r in m.record["layers"]] == [l.top_k for l in layers]
    r = moefy.evaluate(m, ids)
    assert r["moe"]["active_ffn_share"] <= 0.5 + 1e-9
    m.set_active(0.75, budget="uniform")
    assert len({l.top_k for l in layers}) == 1
    plain = moefy.convert(tiny_model("llama"), moe=MoEConfig(**{**cfg.to_dict(), "budget": "uniform"}), data=DATA,
                          tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="--budget sensitivity"):
        plain.set_active(0.5, budget="sensitivity")
