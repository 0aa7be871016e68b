import pytest
import torch

from moefy.studies import core
from test_moe_layer import CASES, D, make_moe


@pytest.mark.parametrize("kind,bias,shared", CASES)
def test_core_ffn_is_the_moe_layer_with_that_fixed_mask(kind, bias, shared):
    _, moe = make_moe(kind, bias, shared)
    experts = torch.tensor([0, 3, 5])
    x = torch.randn(9, D)
    mask = torch.zeros(9, moe.spec["num_experts"], dtype=torch.bool)
    mask[:, experts] = True
    with torch.no_grad():
        torch.testing.assert_close(core.CoreFFN(moe, experts)(x), moe.forward_reference(x, mask), atol=1e-5, rtol=1e-5)


def test_choose_by_count_then_score():
    counts = torch.tensor([3.0, 5.0, 3.0, 0.0, 3.0])
    scores = torch.tensor([1.0, 0.0, 9.0, 50.0, 2.0])
    assert core.choose(counts, scores, 3).tolist() == [1, 2, 4]  # 5 first, then the 3s by score


def test_core_size_budget():
    _, moe = make_moe(top_k=2)
    per_expert = moe.flops_per_token(1) - moe.flops_per_token(0)
    assert core.core_size(moe, "k") == 2
    assert core.core_size(moe, "flops") == min(moe.spec["num_experts"], 2 + moe.router.flops_per_token() // per_expert)


def test_continuation_modes(tiny_llama_moe):
    m = tiny_llama_moe
    blocks = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    result = core.evaluate(m, blocks, prompt_len=12, budget="k")
    assert result["tokens"] == 2 * 12 and set(result["ppl"]) == {"dense", "routed", "core"}
    assert result["ppl"]["routed"] != result["ppl"]["core"]
    # With every expert selected the three modes compute the same model (through the KV cache).
    m.set_routing(top_k=m.layers[0].spec["num_experts"])
    try:
        same = core.evaluate(m, blocks, prompt_len=12, budget="k")["ppl"]
    finally:
        m.set_active(0.5)
    assert same["routed"] == pytest.approx(same["dense"], rel=1e-5)
    assert same["core"] == pytest.approx(same["dense"], rel=1e-5)
    assert not any(isinstance(mod, core.CoreFFN) for mod in m.model.modules())  # swapped back


def test_core_decode_runs_core_experts_only(tiny_llama_moe):
    m = tiny_llama_moe
    prompt = torch.randint(5, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    out = core.decode_speed(m, prompt, new_tokens=4, rounds=1)
    assert set(out) >= {"routed", "core", "dense"} and out["core"]["tok_s"] > 0
    assert out["core"]["tokens"] != [] and len(out["routed"]["tokens"]) == 4
