"""Sparse Expansion on tiny models: 1 expert = SparseGPT, nearest-centroid routing, sequential
calibration, CSR storage, save/load bit-identical (moefy.load and trust_remote_code)."""

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

import moefy
from moefy.cli import app
from moefy.config import DataConfig
from moefy.errors import ConfigError
from moefy.expansion.pruning import InputStats, PruneConfig, sparsegpt
from moefy.expansion.sparse_expansion import ExpansionConfig, block_inputs, ffn_inputs, hidden, prune_ffn, sparse_layers, sparsify
from moefy.modeling.sparse_ffn import SparseExpertFFN

from conftest import outputs, tiny_model

DATA = DataConfig(source="pydoc", seq_len=32, tokens=1024, batch_size=16)
runner = CliRunner()


@pytest.fixture
def ids():
    return torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.compat
def test_every_family_expands_and_reloads_bit_identically(model_type, tokenizer, ids, tmp_path):
    m = sparsify(tiny_model(model_type), tokenizer, PruneConfig("sparsegpt", 0.5), ExpansionConfig(4, pca_dim=4), DATA)
    layers = sparse_layers(m.model)
    assert len(layers) == 2 and all(l.spec["num_experts"] == 4 for l in layers)
    before = outputs(m.model, ids)
    moefy.save(m, tmp_path / "run")
    assert (tmp_path / "run" / "sparse_ffn.py").exists()
    assert torch.equal(outputs(moefy.load(tmp_path / "run").model, ids), before)
    if model_type == "llama":
        remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run", trust_remote_code=True)
        assert torch.equal(outputs(remote, ids), before)


def test_one_expert_is_plain_sparsegpt(tokenizer):
    model = tiny_model("llama")
    family = moefy.MoEModel(model, tokenizer).family
    states = block_inputs(model, family, _calib(tokenizer), DATA.batch_size)
    x = ffn_inputs(family.block_list(model)[0], family, states)
    ffn = family.dense_ffn(family.block_list(model)[0], model.config)
    m = sparsify(tiny_model("llama"), tokenizer, PruneConfig("sparsegpt", 0.6), ExpansionConfig(1), DATA)
    layer = sparse_layers(m.model)[0]
    expected = prune_ffn(ffn, x, PruneConfig("sparsegpt", 0.6))
    for name, w in expected.items():
        assert torch.equal(layer.dense(name, 0), w)
    # and prune_ffn is SparseGPT: gate from the FFN inputs, down from the pruned hidden activations
    gate = sparsegpt(ffn.w_in, _hessian(x), 0.6)
    assert torch.equal(expected["w_in"], gate)
    h = hidden(ffn, x, gate, sparsegpt(ffn.w_up, _hessian(x), 0.6))
    assert torch.equal(expected["w_out"], sparsegpt(ffn.w_out.T, _hessian(h), 0.6))


def test_calibration_is_sequential(tokenizer):
    """Layer 1 is calibrated on what the model with a pruned layer 0 feeds it."""
    m = sparsify(tiny_model("llama"), tokenizer, PruneConfig("magnitude", 0.9), ExpansionConfig(1), DATA)
    family, calib = m.family, _calib(tokenizer)
    seen = []
    hook = family.block_list(m.model)[1].get_submodule(family.ffn).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    for batch in calib.split(DATA.batch_size):
        m.model(input_ids=batch)
    hook.remove()
    states = block_inputs(m.model, family, calib, DATA.batch_size)
    states = [(family.block_list(m.model)[0](h, **kw), kw) for h, kw in states]
    torch.testing.assert_close(ffn_inputs(family.block_list(m.model)[1], family, states), torch.cat(seen))


def test_routing_is_nearest_centroid():
    torch.manual_seed(0)
    D, P, E = 12, 3, 5
    layer = _random_layer(D, 20, E, P)
    x = torch.randn(300, D)
    z = (x - layer.pca_mean) @ layer.pca_basis.T
    expected = torch.cdist(z.double(), layer.centroids.double()).argmin(1)
    assert torch.equal(layer.route(x), expected)
    assert len(set(expected.tolist())) > 1


def test_forward_uses_each_tokens_expert_and_csr_round_trips():
    torch.manual_seed(1)
    layer = _random_layer(12, 20, 3, 2)
    x = torch.randn(40, 12)
    e = layer.route(x)
    ref = []
    for t in range(len(x)):
        w = {n: layer.dense(n, int(e[t])) for n in ("w_in", "w_up", "w_out")}
        h = torch.nn.functional.silu(x[t] @ w["w_in"].T) * (x[t] @ w["w_up"].T)
        ref.append(h @ w["w_out"].T)
    torch.testing.assert_close(layer(x), torch.stack(ref), atol=1e-4, rtol=1e-4)
    layer.execution = "dense"
    torch.testing.assert_close(layer(x), torch.stack(ref), atol=1e-4, rtol=1e-4)


def test_csr_storage_is_exact_and_compact():
    torch.manual_seed(2)
    experts = [_sparse_mats(12, 20, seed=s) for s in range(3)]
    layer = SparseExpertFFN.from_experts(kind="swiglu", act="silu", experts=experts,
                                         pca_mean=torch.zeros(12), pca_basis=torch.randn(2, 12),
                                         centroids=torch.randn(3, 2))
    for e, mats in enumerate(experts):
        for name, w in mats.items():
            assert torch.equal(layer.dense(name, e), w)
    assert layer.w_in_col.dtype == torch.int16 and layer.w_in_val.shape == (3, int((experts[0]["w_in"] != 0).sum()))
    assert not any(b.shape[-2:] == (20, 12) for b in layer.buffers())  # no dense copies stored


def test_bad_expansion_settings():
    with pytest.raises(ConfigError, match="at least 1"):
        ExpansionConfig(0).validate(PruneConfig())
    with pytest.raises(ConfigError, match="magnitude"):
        ExpansionConfig(4).validate(PruneConfig("magnitude"))
    with pytest.raises(ConfigError, match="pca_dim"):
        ExpansionConfig(4, pca_dim=64).validate(PruneConfig(), hidden=32)


FAST = ["--calib", "pydoc", "--calib-tokens", "2048", "--seq-len", "32", "--eval-data", "pydoc:heldout",
        "--eval-tokens", "512"]


def test_cli_prune_then_eval(tiny_folder, tmp_path):
    out, js = tmp_path / "run", tmp_path / "eval.json"
    r = runner.invoke(app, ["prune", str(tiny_folder), "--method", "wanda", "--nm", "2:4", "--experts", "2",
                            "--pca-dim", "4", "--out", str(out), "--json", str(js), *FAST])
    assert r.exit_code == 0, r.output
    result = json.loads(js.read_text())
    assert result["active_ffn_share"] < 0.55 and result["ppl"] > 1 and result["dense_ppl"] > 1
    run = json.loads((out / "moefy_run.json").read_text())
    assert run["command"] == "prune" and run["seeds"] == {"expansion": 0} and run["settings"]["prune"]["nm"] == [2, 4]
    assert run == {**json.loads(js.with_name(f"{js.stem}.moefy_run.json").read_text()), "created": run["created"]}
    r = runner.invoke(app, ["eval", str(out), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "32"])
    assert r.exit_code == 0 and f"{result['ppl']:.3f}" in r.output, r.output


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "sparsity"), (["--nm", "2-4"], "N:M"), (["--nm", "2:4", "--sparsity", "0.7"], "fixes"),
    (["--experts", "0"], "experts"), (["--method", "obs"], "unknown pruning"),
    (["--method", "magnitude", "--experts", "4"], "magnitude"),
])
def test_cli_bad_settings_one_line_exit_2(tiny_folder, tmp_path, args, message):
    out = tmp_path / "run"
    r = runner.invoke(app, ["prune", str(tiny_folder), "--out", str(out), *FAST, *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _hessian(x):
    stats = InputStats(x.shape[1])
    for chunk in x.split(4096):
        stats.add_batch(chunk)
    return stats.hessian()


def _calib(tokenizer):
    from moefy.pipeline.data import blocks

    return blocks(DATA.source, tokenizer, DATA.seq_len, max_tokens=DATA.tokens)


def _sparse_mats(D, I, seed):
    g = torch.Generator().manual_seed(seed)
    mats = {"w_in": torch.randn(I, D, generator=g), "w_up": torch.randn(I, D, generator=g),
            "w_out": torch.randn(D, I, generator=g)}
    for w in mats.values():
        w.view(-1)[torch.randperm(w.numel(), generator=g)[: w.numel() // 2]] = 0
    return mats


def _random_layer(D, I, E, P):
    return SparseExpertFFN.from_experts(kind="swiglu", act="silu", experts=[_sparse_mats(D, I, s) for s in range(E)],
                                        pca_mean=torch.randn(D), pca_basis=torch.randn(P, D),
                                        centroids=torch.randn(E, P) * 2)
