"""The down-row refit (moefy.pipeline.refit): the ridge solution itself, what it changes and keeps, and the
stage inside convert (all at once and layer by layer), saved and reloaded."""

import pytest
import torch
import transformers
from typer.testing import CliRunner

import moefy
from moefy.pipeline import refit
from moefy.cli import app
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError
from moefy.pipeline.layerwise import LayerwiseConfig

from conftest import outputs, save_tiny_llama, tiny_model
from test_moe_layer import CASES, D, dense_forward, make_moe

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)
SKETCH = MoEConfig(num_experts=64, active=0.25, shared=0.0, router="sketch")


@pytest.fixture
def ids():
    return torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def inputs(n=600, seed=2):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def down_rows(layer):
    return refit._down_rows(layer).clone()


@pytest.mark.parametrize("kind,bias,shared", CASES)
@torch.no_grad()
def test_refit_layer_is_the_ridge_solution(kind, bias, shared):
    """With a selection the down rows do not change (an mlp router), the refitted rows are the
    least-squares solution of the stacked problem [A; r I] W' = [B W; r W], and the output error
    on the inputs falls."""
    f, layer = make_moe(kind, bias, shared, top_k=2)
    x = inputs()
    probe = x[refit._probe(len(x))]
    lam = 0.1
    w = down_rows(layer).double()
    a, b = refit._activations(layer, x)
    a, b = a.double(), b.double()
    ridge = lam * (a * a).sum(0).mean()
    eye = torch.eye(len(w), dtype=torch.float64)
    expected = torch.linalg.lstsq(torch.cat([a, ridge.sqrt() * eye]), torch.cat([b @ w, ridge.sqrt() * w])).solution
    report = refit.refit_layer(layer, x, lam, chunk=256)["down_refit"]  # chunks: sums over several steps
    torch.testing.assert_close(down_rows(layer).double(), expected, atol=1e-4, rtol=1e-4)
    assert report["tokens"] == len(x) and report["lam"] == lam
    assert report["error_after"] < report["error_before"]
    assert layer.tokens_seen == 0  # the counters are left clean
    for key, rows in (("error_before", w), ("error_after", down_rows(layer))):  # against the true dense FFN
        y = refit._activations(layer, probe)[0] @ rows.float()
        if layer.b_out is not None:
            y = y + layer.b_out
        dense = dense_forward(f, probe)
        assert report[key] == pytest.approx(float((y - dense).square().sum() / dense.square().sum()), rel=1e-3)


@torch.no_grad()
def test_every_expert_selected_keeps_the_rows():
    """Nothing dropped, nothing to make up for: the dense rows are already the solution."""
    f, layer = make_moe("swiglu", False, 12, top_k=6)
    assert layer.top_k == layer.spec["num_experts"]
    w = down_rows(layer)
    report = refit.refit_layer(layer, inputs(), 0.1)["down_refit"]
    torch.testing.assert_close(down_rows(layer), w, atol=1e-4, rtol=1e-4)
    assert report["error_before"] < 1e-10 and report["error_after"] < 1e-8
    x = inputs(8, seed=5)
    torch.testing.assert_close(layer(x), dense_forward(f, x), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_strong_ridge_keeps_the_rows_and_unselected_neurons_keep_theirs():
    _, layer = make_moe("swiglu", False, 0, E=48, router="sketch", top_k=6, channels=0.5)
    w = down_rows(layer)
    x = inputs()
    chosen = layer.route(x).any(0)
    refit.refit_layer(layer, x, 1e6)
    torch.testing.assert_close(down_rows(layer), w, atol=1e-4, rtol=1e-4)
    _, layer = make_moe("swiglu", False, 0, E=48, router="sketch", top_k=6, channels=0.5)
    refit.refit_layer(layer, x, 0.1)
    new = down_rows(layer)
    assert not torch.allclose(new[chosen], w[chosen], atol=1e-3)
    torch.testing.assert_close(new[~chosen], w[~chosen], atol=1e-5, rtol=1e-5)  # their Gram rows are 0


@torch.no_grad()
def test_sketch_thresholds_are_fitted_again_on_the_new_rows():
    """A sketch router ranks by the down rows' norms: its score quantiles follow the refit, so
    the mean count it selects on the inputs stays the top-k's."""
    _, layer = make_moe("swiglu", False, 0, E=48, router="sketch", top_k=12, channels=0.5, threshold=True)
    x = inputs(2000)
    layer.fit_score_quantiles(x)
    assert layer.thresholded
    before = layer.router.quantiles.clone()
    report = refit.refit_layer(layer, x, 0.1)["down_refit"]
    assert not torch.equal(layer.router.quantiles, before)
    assert report["error_after"] < report["error_before"]
    assert layer.route(x).sum(1).float().mean().item() == pytest.approx(12, rel=0.1)


@torch.no_grad()
def test_a_refit_that_does_not_lower_the_error_is_undone(monkeypatch):
    _, layer = make_moe("swiglu", False, 0, E=48, router="sketch", top_k=12, channels=0.5, threshold=True)
    x = inputs(2000)
    layer.fit_score_quantiles(x)
    w, quantiles = down_rows(layer), layer.router.quantiles.clone()
    errors = iter([0.1, 0.2])
    monkeypatch.setattr(refit, "output_error", lambda *_: next(errors))
    report = refit.refit_layer(layer, x, 0.1)["down_refit"]
    assert report["kept"] is False and report["error_after"] == 0.2
    assert torch.equal(down_rows(layer), w) and torch.equal(layer.router.quantiles, quantiles)


def test_refit_errors():
    with pytest.raises(ConfigError, match="positive"):
        MoEConfig(refit_down=0.0).validate()
    with pytest.raises(ConfigError, match="own"):
        MoEConfig(refit_down=0.1, router_input="previous").validate()
    _, layer = make_moe()
    with pytest.raises(ConfigError, match="positive"):
        refit.refit_layer(layer, inputs(), -1.0)


def _refits(m):
    reports = [r["down_refit"] for r in m.record["layers"]]
    assert len(reports) == len(m.layers) == 2
    assert all(r["error_after"] < r["error_before"] for r in reports if r["kept"])
    assert any(r["kept"] for r in reports)
    return reports


def test_convert_refits_saves_and_reloads(tokenizer, tmp_path, ids):
    plain = moefy.convert(tiny_model("llama"), moe=SKETCH, data=DATA, tokenizer=tokenizer)
    m = moefy.convert(tiny_model("llama"), moe=MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1}), data=DATA,
                      tokenizer=tokenizer)
    _refits(m)
    assert m.record["moe"]["refit_down"] == 0.1
    for a, b in zip(plain.layers, m.layers):
        assert torch.equal(a.w_in, b.w_in) and not torch.equal(a.w_out, b.w_out)
        assert a.top_k == b.top_k and a.tokens_seen == b.tokens_seen == 0
    expected = outputs(m.model, ids)
    path = moefy.save(m, tmp_path / "run")
    torch.testing.assert_close(outputs(moefy.load(path).model, ids), expected, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    torch.testing.assert_close(outputs(hf, ids), expected, atol=1e-4, rtol=1e-4)  # the torch paths


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_refit_in_other_families(model_type, tokenizer):
    m = moefy.convert(tiny_model(model_type), moe=MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1}), data=DATA,
                      tokenizer=tokenizer)
    _refits(m)


def test_layerwise_refit_on_sparse_inputs(tokenizer, ids):
    moe = MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1})
    m = moefy.convert(tiny_model("llama"), moe=moe, data=DATA, tokenizer=tokenizer,
                      layerwise=LayerwiseConfig(propagate="moe"))
    _refits(m)
    # the first layer sees the same inputs either way: the same refit as all at once
    whole = moefy.convert(tiny_model("llama"), moe=moe, data=DATA, tokenizer=tokenizer)
    torch.testing.assert_close(m.layers[0].w_out, whole.layers[0].w_out, atol=1e-5, rtol=1e-5)


def test_layerwise_refit_reads_the_profiled_inputs(tokenizer, monkeypatch):
    """Layer by layer, the refit takes the FFN inputs profiling kept instead of running each block
    again; they are the same inputs, so the model is the one the second run would give."""
    from moefy.pipeline import layerwise

    moe = MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1})
    reruns = []
    real = layerwise.ffn_inputs
    monkeypatch.setattr(layerwise, "ffn_inputs", lambda *a: reruns.append(1) or real(*a))
    lw = LayerwiseConfig(propagate="moe")
    kept = moefy.convert(tiny_model("llama"), moe=moe, data=DATA, tokenizer=tokenizer, layerwise=lw)
    assert reruns == []
    monkeypatch.setattr(layerwise, "refit_inputs", lambda block, layer, states, _kept: real(block, layer, states))
    rerun = moefy.convert(tiny_model("llama"), moe=moe, data=DATA, tokenizer=tokenizer, layerwise=lw)
    for a, b in zip(kept.layers, rerun.layers, strict=True):
        assert a.spec == b.spec
        torch.testing.assert_close(a.w_out, b.w_out, atol=1e-6, rtol=1e-6)
    for a, b in zip(kept.record["layers"], rerun.record["layers"], strict=True):
        a, b = a["down_refit"], b["down_refit"]
        assert (a["kept"], a["tokens"]) == (b["kept"], b["tokens"])
        assert (a["error_before"], a["error_after"]) == pytest.approx((b["error_before"], b["error_after"]), rel=1e-4)


def test_cli_refit_down_and_its_dense_reference(tokenizer, tmp_path):
    """Every expert active is no longer the dense model once the rows are refitted: evaluation
    runs the source model for the dense reference (the same perplexity as without the refit)."""
    import json

    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    fast = ["--model", str(dense), "--calib", "pydoc", "--experts", "64", "--shared", "0", "--router", "sketch",
            "--active", "0.25", "--calib-tokens", "1024", "--seq-len", "32", "--eval-data", "pydoc:heldout",
            "--eval-tokens", "256"]
    runner = CliRunner()
    r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, "--refit-down", "0", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "positive" in r.output and not (tmp_path / "bad").exists()
    results = {}
    for name, extra in (("plain", []), ("refit", ["--refit-down", "0.1"])):
        out = tmp_path / name
        r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, *extra, "--out", str(out), "--json", str(tmp_path / f"{name}.json")])
        assert r.exit_code == 0, r.output
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    m = moefy.load(tmp_path / "refit")
    assert m.record["layers"][0]["down_refit"]["lam"] == 0.1 and not m.all_experts_is_dense
    assert moefy.load(tmp_path / "plain").all_experts_is_dense
    assert results["refit"]["dense"]["ppl"] == pytest.approx(results["plain"]["dense"]["ppl"], rel=1e-5)
    assert results["refit"]["moe"]["ppl"] != results["plain"]["moe"]["ppl"]


def test_tuning_a_refitted_model_distils_toward_the_source(tokenizer, tmp_path):
    from moefy.tuning import distill as tuning

    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    m = moefy.convert(str(dense), moe=MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1}), data=DATA)
    teacher = tuning._teacher(m)
    ids = torch.randint(5, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(outputs(teacher, ids), outputs(moefy.pipeline.load.load(str(dense)).model, ids))
    with m.all_experts():
        assert not torch.allclose(outputs(m.model, ids), outputs(teacher, ids))


def test_other_shares_warn_and_sweeps_refuse(tokenizer, caplog):
    from moefy.eval import sweep

    m = moefy.convert(tiny_model("llama"), moe=MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1}), data=DATA,
                      tokenizer=tokenizer)
    m.set_active(0.25)
    assert "refitted" not in caplog.text
    m.set_active(0.5)
    assert "refitted for 0.25 active FFN" in caplog.text
    with pytest.raises(ConfigError, match="one active share"):
        sweep.sweep(None, [sweep.Variant()], [0.5], None, base=MoEConfig(refit_down=0.1))


def test_core_analysis_of_a_refitted_model_scores_dense_with_the_source(tokenizer, tmp_path):
    import math

    import torch.nn.functional as F

    from moefy.studies import core

    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    m = moefy.convert(str(dense), moe=MoEConfig(**{**SKETCH.to_dict(), "refit_down": 0.1}), data=DATA)
    blocks = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    got = core.evaluate(m, blocks, prompt_len=12, budget="k")["ppl"]["dense"]
    logits = moefy.pipeline.load.load(str(dense)).model(input_ids=blocks).logits[:, 11:-1]
    expected = math.exp(float(F.cross_entropy(logits.flatten(0, 1), blocks[:, 12:].flatten())))
    assert got == pytest.approx(expected, rel=1e-5)
