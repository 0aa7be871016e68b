import pytest
import torch
import transformers

import moefy
from moefy.pipeline import data as data_mod
from moefy.studies import pregate
from moefy.config import MoEConfig
from moefy.errors import ConfigError
from moefy.modeling.selection import select_experts

from conftest import TINY_MOE, outputs


def cfg(**kw):
    return MoEConfig(**{**TINY_MOE, **kw})


@pytest.fixture
def ids():
    return torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def io_per_layer(m, ids):
    """Every MoE layer's input and output in one forward pass, [T, D] each."""
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, a, y: seen.append((a[0].flatten(0, 1), y.flatten(0, 1))))
             for layer in m.layers]
    try:
        m.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_pregated_convert_routes_from_previous_input_and_reloads(tiny_llama_pregated, tmp_path, ids):
    m = tiny_llama_pregated
    first, second = m.layers
    assert first.router_input == "own" and second.router_input == "previous"
    assert m.record["layers"][1]["router_recall"] > second.top_k / second.spec["num_experts"]  # chance
    # Layer 1's experts are chosen by its router on layer 0's input, and nothing else.
    with m.sparse_only():  # every token routed (no dense prompt path)
        (x0, _), (x1, y1) = io_per_layer(m, ids)
    mask = select_experts(second.router(x0), second.top_k, None)
    torch.testing.assert_close(y1, second.forward_reference(x1, mask), atol=1e-5, rtol=1e-5)
    assert not torch.equal(mask, select_experts(second.router(x1), second.top_k, None))
    expected = outputs(m.model, ids)
    path = moefy.save(m, tmp_path / "run")
    loaded = moefy.load(path)
    assert loaded.layers[1].router_input == "previous"
    torch.testing.assert_close(outputs(loaded.model, ids), expected, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=0, rtol=0)


def test_pregate_an_existing_model_matches_converting_pregated(tiny_llama_moe, tiny_llama_pregated, tokenizer, ids):
    """pregate() on an own-router model trains the same routers as convert --router-input previous."""
    own, built = tiny_llama_moe, tiny_llama_pregated
    calib = data_mod.blocks("pydoc", tokenizer, 32, max_tokens=2048)
    pre = pregate.pregate(own, pregate.train_routers(own, pregate.dense_inputs(own, calib), cfg()))
    torch.testing.assert_close(outputs(pre.model, ids), outputs(built.model, ids), atol=1e-4, rtol=1e-4)
    assert own.layers[1].router_input == "own"  # the source model is unchanged
    assert pre.record["moe"]["router_input"] == "previous"


def test_pregated_layer_needs_its_previous_layer():
    from test_moe_layer import make_moe

    _, moe = make_moe()
    moe.set_router_input("previous")
    with pytest.raises(RuntimeError, match="previous layer"):
        moe(torch.randn(3, moe.spec["hidden"]))


@pytest.mark.parametrize("bad", [dict(router_input="next"), dict(router_input="previous", router="similarity"),
                                 dict(router_input="previous", budget="sensitivity")])
def test_pregate_config_errors(bad):
    with pytest.raises(ConfigError):
        cfg(**bad).validate()
