import json

import pytest
import torch
import transformers

import moefy
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError, DataError, OutputExists

from conftest import outputs, tiny_model

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)


def fast_cfg(**kw):
    return MoEConfig(**{"num_experts": 8, "active": 0.5, "shared": 0.0, "router_steps": 30, "router_hidden": 16, **kw})


@pytest.fixture
def ids():
    return torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_convert_every_family(model_type, tokenizer, ids):
    model = tiny_model(model_type)
    dense = outputs(model, ids)
    m = moefy.convert(model, moe=fast_cfg(), data=DATA, tokenizer=tokenizer)
    assert len(m.layers) == 2
    for layer in m.layers:
        assert layer.top_k is not None and 1 <= layer.top_k < 8
    with m.all_experts():
        torch.testing.assert_close(outputs(m.model, ids), dense, atol=1e-4, rtol=1e-4)
        moefy.evaluate(m, ids)  # runs the dense reference in its own all_experts(): the switches nest
        torch.testing.assert_close(outputs(m.model, ids), dense, atol=1e-4, rtol=1e-4)
    with m.sparse_only():
        sparse = outputs(m.model, ids)
    assert not torch.allclose(sparse, dense, atol=1e-3)
    # a prompt (DENSE_PROMPT_FROM tokens or more) takes the dense FFN; one token at a time is sparse
    torch.testing.assert_close(outputs(m.model, ids, sparse=False), dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(outputs(m.model, ids[:, :1], sparse=False), dense[:, :1], atol=1e-3)
    r = moefy.evaluate(m, ids)
    assert 0 < r["moe"]["active_ffn_share"] <= 0.5 + 1e-9
    assert r["moe"]["ffn_flops_per_token"] < r["dense"]["ffn_flops_per_token"]
    if model.config.model_type != "bert":
        assert r["dense"]["ppl"] > 1 and r["moe"]["ppl"] > 1
    else:
        assert -1 <= r["moe"]["cosine_to_dense"] <= 1


@pytest.mark.parametrize("method,router,shared", [("random", "similarity", 0.0), ("param-kmeans", "representative", 0.25),
                                                  ("coactivation", "mlp", 0.25), ("coactivation", "sketch", 0.0)])
def test_methods_and_routers(method, router, shared, tokenizer, ids):
    model = tiny_model("llama")
    m = moefy.convert(model, moe=fast_cfg(method=method, router=router, shared=shared), data=DATA, tokenizer=tokenizer)
    layer = m.layers[0]
    assert layer.spec["shared"] == round(shared * 8) * 8
    assert 0 <= m.record["layers"][0]["router_recall"] <= 1
    moefy.evaluate(m, ids)


def test_trained_router_beats_chance(tokenizer):
    model = tiny_model("llama")
    m = moefy.convert(model, moe=fast_cfg(router_steps=200, num_experts=16, active=0.3), data=DATA,
                      tokenizer=tokenizer)
    for rep in m.record["layers"]:
        chance = rep["top_k"] / 16
        assert rep["router_recall"] > chance + 0.1, rep


def test_dynamic_k_and_set_routing(tokenizer, ids):
    model = tiny_model("llama")
    m = moefy.convert(model, moe=fast_cfg(active=None, tau=0.5), data=DATA, tokenizer=tokenizer)
    assert m.layers[0].tau == 0.5 and m.layers[0].top_k is None
    loose = moefy.evaluate(m, ids)["moe"]["active_ffn_share"]
    m.set_routing(tau=0.9)
    wide = moefy.evaluate(m, ids)["moe"]["active_ffn_share"]
    assert wide > loose
    m.set_routing(top_k=8)
    r = moefy.evaluate(m, ids)
    assert r["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ConfigError):
        m.set_routing(top_k=9)


@pytest.mark.compat
def test_save_load_identical(model_type, tokenizer, tmp_path, ids):
    model = tiny_model(model_type)
    m = moefy.convert(model, moe=fast_cfg(shared=0.25, active=0.75), data=DATA, tokenizer=tokenizer)
    expected = outputs(m.model, ids)
    path = moefy.save(m, tmp_path / "run")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    loaded = moefy.load(path)
    torch.testing.assert_close(outputs(loaded.model, ids), expected, atol=0, rtol=0)
    auto = transformers.AutoModelForCausalLM if model.config.model_type != "bert" else transformers.AutoModel
    hf = auto.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=0, rtol=0)
    record = json.loads((path / "moefy.json").read_text())
    assert record["moe"]["method"] == "coactivation"
    layer0 = record["assignment"][0]
    assert sorted(layer0["shared"] + sum(layer0["experts"], [])) == list(range(64))
    assert "torch" in record["versions"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_quant_router_saves_and_reloads_identically(model_type, tokenizer, tmp_path, ids):
    """The quantised router's 4-bit copy is saved; the reloaded model (moefy or plain
    transformers) routes and computes the same, per token as at decode and as a prompt."""
    m = moefy.convert(tiny_model(model_type), moe=fast_cfg(router="quant", num_experts=64, shared=0.0,
                                                           router_approx=0.2), data=DATA, tokenizer=tokenizer)
    r = m.layers[0].router
    assert r.q_in.dtype == torch.uint8 and r.q_in.abs().sum() > 0 and r.threshold and m.layers[0].approx_k > 0
    expected, prompt = outputs(m.model, ids), outputs(m.model, ids, sparse=False)
    path = moefy.save(m, tmp_path / "run")
    reloaded = moefy.load(path)
    assert torch.equal(reloaded.layers[0].router.q_in, r.q_in)
    torch.testing.assert_close(outputs(reloaded.model, ids), expected, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=0, rtol=0)
    torch.testing.assert_close(outputs(hf, ids, sparse=False), prompt, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_sketch_router_saves_and_reloads_identically(model_type, tokenizer, tmp_path, ids):
    """The sketch router has no weights: its channel share travels in the config, and the
    reloaded model (moefy or plain transformers) routes and computes the same."""
    m = moefy.convert(tiny_model(model_type), moe=fast_cfg(router="sketch", router_channels=0.4, num_experts=64,
                                                           shared=0.125), data=DATA, tokenizer=tokenizer)
    assert m.layers[0].router.kept == round(0.4 * 32)
    k = m.layers[0].top_k
    m.set_router_channels(0.2)  # a cheaper router leaves room for more experts at the same share
    m.set_active(0.5)
    assert m.layers[0].router.kept == round(0.2 * 32) and m.layers[0].top_k > k
    expected = outputs(m.model, ids)
    path = moefy.save(m, tmp_path / "run")
    reloaded = moefy.load(path)
    assert reloaded.layers[0].router.kept == round(0.2 * 32) and reloaded.layers[0].top_k == m.layers[0].top_k
    assert reloaded.layers[0].router.reuse  # the selected neurons complete the sketch's sums (the default)
    torch.testing.assert_close(outputs(reloaded.model, ids), expected, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=0, rtol=0)


def test_sketch_channels_follow_the_active_share_by_default(tokenizer, tmp_path, ids):
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(router="sketch", num_experts=64, active=0.5), data=DATA,
                      tokenizer=tokenizer)
    layer = m.layers[0]
    assert layer.router.auto and layer.router.reuse and layer.router.channels == 0.4  # 0.8 x 0.5 with reuse
    m.set_active(0.75)
    assert layer.router.channels == 0.6 and layer.flops_per_token(layer.top_k) <= 0.75 * layer.dense_flops_per_token()
    k = layer.top_k
    with pytest.raises(ConfigError):  # nothing fits: the share and the top-k stay as they were
        m.set_active(0.01)
    assert layer.router.channels == 0.6 and layer.top_k == k
    reloaded = moefy.load(moefy.save(m, tmp_path / "run"))
    assert reloaded.layers[0].router.auto and reloaded.layers[0].router.channels == 0.6
    torch.testing.assert_close(outputs(reloaded.model, ids), outputs(m.model, ids), atol=0, rtol=0)
    m.set_router_channels(0.2)  # an explicit share stays put
    m.set_active(0.5)
    assert not layer.router.auto and layer.router.channels == 0.2
    k = layer.top_k
    m.set_router_reuse(False)  # every selected neuron then costs a full one: fewer fit
    m.set_active(0.5)
    assert not layer.router.reuse and layer.top_k < k
    fresh = moefy.convert(tiny_model("llama"), moe=fast_cfg(router="sketch", num_experts=64, active=0.5,
                                                            router_reuse=False), data=DATA, tokenizer=tokenizer)
    assert fresh.layers[0].router.channels == 0.3  # 0.6 x 0.5 without reuse
    reloaded = moefy.load(moefy.save(m, tmp_path / "run2"))
    assert not reloaded.layers[0].router.reuse and reloaded.layers[0].top_k == layer.top_k
    torch.testing.assert_close(outputs(reloaded.model, ids), outputs(m.model, ids), atol=0, rtol=0)


def test_save_refuses_existing_without_overwrite(tokenizer, tmp_path, ids):
    m = moefy.convert(tiny_model("gpt2"), moe=fast_cfg(router="similarity"), data=DATA, tokenizer=tokenizer)
    target = tmp_path / "run"
    target.mkdir()
    (target / "precious.txt").write_text("user data")
    with pytest.raises(OutputExists):
        moefy.save(m, target)
    assert (target / "precious.txt").read_text() == "user data"
    moefy.save(m, target, overwrite=True)
    assert not (target / "precious.txt").exists()
    assert moefy.load(target).layers


def test_convert_errors(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="divide the FFN width"):
        moefy.convert(model, moe=fast_cfg(num_experts=7), data=DATA, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="cannot exceed"):
        moefy.convert(model, moe=fast_cfg(num_experts=128), data=DATA, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="active share"):
        moefy.convert(model, moe=fast_cfg(active=1.5), data=DATA, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="no room"):
        moefy.convert(model, moe=fast_cfg(active=0.05), data=DATA, tokenizer=tokenizer)
    with pytest.raises(DataError, match="fewer than"):
        moefy.convert(model, moe=fast_cfg(), data=DataConfig(source="pydoc", seq_len=32, tokens=1024),
                      tokenizer=tokenizer)


def test_set_active_changes_budget(tokenizer, ids):
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(num_experts=16), data=DATA, tokenizer=tokenizer)
    shares = []
    for share in (0.3, 0.6, 0.9):
        m.set_active(share)
        shares.append(moefy.evaluate(m, ids)["moe"]["active_ffn_share"])
        assert shares[-1] <= share + 1e-9
    assert shares == sorted(shares)
    with pytest.raises(ConfigError):
        m.set_active(0)


def test_a_changed_selection_is_what_reloads(tokenizer, tmp_path, ids):
    """Load, change top-k or tau, save (as `moefy tune --active` does): the new folder reloads with
    the new selection, not the one it was loaded with."""
    first = moefy.save(moefy.convert(tiny_model("llama"), moe=fast_cfg(num_experts=16, active=0.6), data=DATA,
                                     tokenizer=tokenizer), tmp_path / "a")
    m = moefy.load(first)
    m.set_active(0.3)
    ks = [layer.top_k for layer in m.layers]
    assert ks != [layer.top_k for layer in moefy.load(first).layers]
    assert [layer.top_k for layer in moefy.load(moefy.save(m, tmp_path / "b")).layers] == ks
    m.set_routing(tau=0.4)
    assert {layer.tau for layer in moefy.load(moefy.save(m, tmp_path / "c")).layers} == {0.4}


def test_oracle_routing_is_at_least_as_good(tokenizer, ids):
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(num_experts=16, active=0.4), data=DATA, tokenizer=tokenizer)
    blocks = moefy.pipeline.data.blocks("pydoc:heldout", tokenizer, 32, max_tokens=512)
    r = moefy.evaluate(m, blocks, oracle=True)
    assert r["oracle"]["ppl"] <= r["moe"]["ppl"] * 1.02
    assert 0 < r["oracle"]["router_recall"] <= 1
    with m.oracle():  # the oracle picks exactly the largest-norm experts
        layer = m.layers[0]
        x = torch.randn(5, 32)
        norms = layer.expert_norms(x)
        chosen = layer.route(x)
        assert torch.equal(chosen, torch.zeros_like(chosen).scatter_(1, norms.topk(layer.top_k).indices, True))
    assert not m.layers[0].oracle


@pytest.mark.parametrize("loss", ["log-norm", "norm", "bce"])
def test_router_losses(loss, tokenizer, ids):
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(router_loss=loss, router_steps=100, num_experts=16, active=0.4),
                      data=DATA, tokenizer=tokenizer)
    assert all(r["router_recall"] > 0.3 for r in m.record["layers"])
    scores = m.layers[0].router(torch.randn(4, 32))
    if loss == "bce":
        assert ((scores >= 0) & (scores <= 1)).all()
    m.set_routing(tau=0.5)  # dynamic-k works on every router output
    assert moefy.evaluate(m, ids)["moe"]["mean_k"] >= 1


def test_representative_router_picks_the_best_correlated_neuron():
    """An expert whose output is driven by one neuron gets that neuron as its representative."""
    from moefy.arch import DenseFFN
    from moefy.modeling.moe_layer import MoEFFN
    from moefy.pipeline.route import init_representative

    g = torch.Generator().manual_seed(0)
    w_in = torch.randn(8, 6, generator=g)
    w_out = torch.full((8, 6), 1e-3)
    w_out[5] = 10.0  # neuron 5 dominates expert 1's output
    ffn = DenseFFN("mlp", "relu", w_in, None, None, w_out, None)
    moe = MoEFFN.from_dense(ffn, torch.tensor([], dtype=torch.long), torch.arange(8).view(2, 4),
                            {"kind": "representative"}, top_k=1)
    init_representative(moe, torch.randn(500, 6, generator=g))
    torch.testing.assert_close(moe.router.w_in[1], w_in[5])


def test_same_seed_same_model_whatever_ran_before(tokenizer, ids):
    def run():
        return moefy.convert(tiny_model("llama"), moe=fast_cfg(), data=DATA, tokenizer=tokenizer)

    a = run()
    torch.randn(1000)  # consume the global RNG in between
    b = run()
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.expert_neurons, lb.expert_neurons)
        for pa, pb in zip(la.router.parameters(), lb.router.parameters()):
            assert torch.equal(pa, pb)
    torch.testing.assert_close(outputs(a.model, ids), outputs(b.model, ids), atol=0, rtol=0)


def test_sketched_experts_convert_save_and_reload_exactly(tokenizer, tmp_path, ids):
    """--router-approx: the budget splits between exact and sketched experts; the saved folder
    reloads with them, in moefy and in plain transformers."""
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(router="sketch", num_experts=64, shared=0.0, active=0.5,
                                                        router_approx=0.3), data=DATA, tokenizer=tokenizer)
    layer = m.layers[0]
    assert layer.router.approx == 0.3 and layer.approx_k > 0
    assert layer.flops_per_token(layer.top_k) <= 0.5 * layer.dense_flops_per_token()
    expected = outputs(m.model, ids)
    path = moefy.save(m, tmp_path / "run")
    reloaded = moefy.load(path)
    assert reloaded.layers[0].approx_k == layer.approx_k and reloaded.layers[0].top_k == layer.top_k
    torch.testing.assert_close(outputs(reloaded.model, ids), expected, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=1e-4, rtol=1e-4)  # the torch paths, not the kernels
    assert layer.thresholded and reloaded.layers[0].thresholds() == layer.thresholds()  # the default selection
    k, k_b = layer.top_k, layer.approx_k
    reloaded.set_router_approx(0.0)  # the recorded share is applied again: all of it to exact experts
    assert reloaded.layers[0].approx_k == 0 and reloaded.layers[0].top_k > k
    with pytest.raises(ConfigError, match="sketch"):
        moefy.convert(tiny_model("llama"), moe=fast_cfg(router_approx=0.3), data=DATA, tokenizer=tokenizer)


def test_sketch_conversions_get_sketched_experts_by_default():
    """Unset, a sketch router's approx share is SKETCH_APPROX_DEFAULT with a fixed top-k and 0
    with dynamic-k; other routers have none."""
    from moefy.modeling.router_sketch import SKETCH_APPROX_DEFAULT
    from moefy.pipeline.route import router_spec

    fixed = router_spec("sketch", MoEConfig(router="sketch", active=0.5))
    assert fixed["options"]["approx"] == SKETCH_APPROX_DEFAULT == 0.3
    assert router_spec("sketch", MoEConfig(router="sketch", active=None, tau=0.5))["options"]["approx"] == 0.0
    assert router_spec("sketch", MoEConfig(router="sketch", router_approx=0.0))["options"]["approx"] == 0.0
    assert "options" not in router_spec("similarity", MoEConfig(router="similarity"))
    MoEConfig(router="sketch", tau=0.5).validate()  # the default does not clash with tau
    with pytest.raises(ConfigError, match="fixed top-k"):
        MoEConfig(router="sketch", active=None, tau=0.5, router_approx=0.3).validate()
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        MoEConfig(router="sketch", router_approx=1.0).validate()


def test_sketch_thresholds_by_default_and_their_errors(tokenizer):
    """Unset, a sketch router selects by score thresholds with a fixed top-k and by dynamic-k with
    tau; --router-top-k converts without them, and they cannot be switched on after."""
    from moefy.pipeline.route import router_spec

    assert router_spec("sketch", MoEConfig(router="sketch", active=0.5))["options"]["threshold"] is True
    assert router_spec("sketch", MoEConfig(router="sketch", active=None, tau=0.5))["options"]["threshold"] is False
    with pytest.raises(ConfigError, match="fixed top-k"):
        MoEConfig(router="sketch", active=None, tau=0.5, router_threshold=True).validate()
    with pytest.raises(ConfigError, match="sketch"):
        MoEConfig(router="mlp", router_threshold=True).validate()
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(router="sketch", num_experts=64, shared=0.0,
                                                        router_threshold=False), data=DATA, tokenizer=tokenizer)
    assert not any(layer.thresholded or layer.router.grid for layer in m.layers)
    with pytest.raises(ConfigError, match="no fitted score quantiles"):
        m.set_router_threshold(True)
    m.set_router_threshold(False)  # already so: allowed


def test_pruned_sketch_converts_saves_and_reloads_exactly(tokenizer, tmp_path, ids):
    """--router-sparsity: the conversion fits each layer's channel norms and sketch density; the
    channels follow the active share at 0.8 x share / (1 - s); the folder reloads with them, in
    moefy and in plain transformers."""
    m = moefy.convert(tiny_model("llama"), moe=fast_cfg(router="sketch", num_experts=64, shared=0.0, active=0.5,
                                                        router_sparsity=0.5), data=DATA, tokenizer=tokenizer)
    layer = m.layers[0]
    r = layer.router
    assert r.sparsity == 0.5 and r.reuse and r.channels == 0.8  # 0.8 x 0.5 / (1 - 0.5)
    assert float(r.channel_norms.min()) > 0 and 0.5 <= r.density_at(r.kept) < 1
    assert m.record["moe"]["router_sparsity"] == 0.5
    # the top-k is taken at the density measured on the calibration text: the largest that fits
    assert layer.flops_per_token(layer.top_k) <= 0.5 * layer.dense_flops_per_token()
    assert layer.top_k == layer.top_k_for_share(0.5)
    m.set_active(0.25)
    assert r.channels == 0.4
    m.set_active(0.5)
    expected = outputs(m.model, ids)
    path = moefy.save(m, tmp_path / "run")
    reloaded = moefy.load(path)
    assert reloaded.layers[0].router.sparsity == 0.5 and reloaded.layers[0].top_k == layer.top_k
    torch.testing.assert_close(reloaded.layers[0].router.channel_norms, r.channel_norms, atol=0, rtol=0)
    torch.testing.assert_close(outputs(reloaded.model, ids), expected, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=1e-4, rtol=1e-4)  # the torch paths, not the kernels
    for bad, match in ((dict(router_sparsity=0.5), "--router sketch"), (dict(router="sketch", router_sparsity=1.0), r"\[0, 1\)")):
        with pytest.raises(ConfigError, match=match):
            moefy.convert(tiny_model("llama"), moe=fast_cfg(**bad), data=DATA, tokenizer=tokenizer)
