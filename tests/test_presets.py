"""Presets: named recipes that fit any FFN width, overridden by single flags; `moefy presets`."""

import json

import pytest
from typer.testing import CliRunner

from moefy import presets
from moefy.cli import app
from moefy.config import MoEConfig
from moefy.errors import ConfigError

from conftest import save_tiny_llama

runner = CliRunner()


def test_sketch_preset_is_the_former_demo_recipe():
    """sketch = the recipe `make demo` ran as flags before the quantised router (--router sketch
    --experts 1536 --shared 0 --router-sparsity 0.33 --router-approx 0.4 --refit-down 1.0) on
    SmolLM2's width 1536."""
    demo = MoEConfig(num_experts=1536, router="sketch", shared=0.0, router_sparsity=0.33, router_approx=0.4,
                     refit_down=1.0)
    cfg = presets.get("sketch").moe_config()
    assert presets.DEFAULT == "balanced" and presets.get(None).moe["router"] == "quant"
    assert cfg.experts_for(1536) == 1536
    skip = {"num_experts", "expert_size"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in skip} == \
        {k: v for k, v in demo.to_dict().items() if k not in skip}


@pytest.mark.parametrize("name", presets.names())
@pytest.mark.parametrize("width", [1536, 8960, 2048, 384])
def test_every_preset_fits_every_width(name, width):
    cfg = presets.get(name).moe_config()
    cfg.validate(width)
    assert width % cfg.experts_for(width) == 0 and cfg.experts_for(width) >= 2


def test_flags_override_a_preset():
    p = presets.get("balanced")
    assert p.moe_config(active=0.3).active == 0.3
    cfg = p.moe_config(num_experts=8)  # a number of experts replaces the preset's expert size
    assert (cfg.num_experts, cfg.expert_size) == (8, None)
    assert p.moe_config(tau=0.2).active is None
    other = p.moe_config(router="mlp")  # another router kind drops the preset router's settings
    assert other.router_sparsity == 0.0 and other.router_approx is None
    assert presets.get("sketch").moe_config(router="quant").router_sparsity == 0.0
    other.validate()


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of balanced"):
        presets.get("nope")
    bad = tmp_path / "bad.json"
    for content, message in [("[1]", "one JSON object"), ('{"moe": 3}', "'moe' must be a JSON object"),
                             ('{"moe": {"experts": 8}}', "unknown MoEConfig settings ['experts']"),
                             ('{"recipe": {}}', "unknown keys ['recipe']"), ("{", "is not a JSON preset"),
                             ('{"moe": {"active": 2}}', "active share must be in (0, 1]")]:
        bad.write_text(content)
        with pytest.raises(ConfigError, match=None) as err:
            presets.get(str(bad))
        assert message in str(err.value), (content, err.value)
    with pytest.raises(ConfigError, match="cannot read the preset file"):
        presets.get(str(tmp_path / "missing.json"))


def test_a_preset_file_round_trips(tmp_path):
    r = runner.invoke(app, ["presets", "quarter"])
    assert r.exit_code == 0, r.output
    f = tmp_path / "mine.json"
    f.write_text(r.output)
    mine = presets.get(str(f))
    assert mine.moe_config() == presets.get("quarter").moe_config()
    assert mine.data_config() == presets.get("quarter").data_config()


def test_presets_command_lists_them_with_results():
    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0, r.output
    for name in presets.names():
        assert name in r.output
    assert "(default)" in r.output and "measured:" in r.output
    assert json.loads(runner.invoke(app, ["presets", "balanced"]).output)["moe"]["expert_size"] == 1


def test_convert_refuses_bad_settings_before_loading(tmp_path, tokenizer, monkeypatch):
    """An unknown preset, or experts that do not divide the FFN width, give one line and exit 2
    before any weights are read, and nothing is written."""
    from moefy.pipeline import load

    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    monkeypatch.setattr(load, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    for args, message in [(["--preset", "nope"], "unknown preset 'nope'"),
                          (["--experts", "7"], "must divide the FFN width"),
                          (["--expert-size", "5"], "must divide the FFN width"),
                          (["--active", "0.05"], "the quant router alone reads")]:
        r = runner.invoke(app, ["convert", "--model", str(dense), "--out", str(out), *args])
        assert r.exit_code == 2, r.output
        assert r.output.strip().startswith("error:") and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not out.exists()


def test_convert_with_no_flags_uses_the_default_preset(tmp_path, tokenizer):
    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", "--model", str(dense), "--out", str(out), "--calib", "pydoc",
                            "--calib-tokens", "512", "--seq-len", "32", "--no-eval"])
    assert r.exit_code == 0, r.output
    moe = json.loads((out / "moefy.json").read_text())["moe"]
    assert {k: moe[k] for k in presets.get("balanced").moe} == \
        {**presets.get("balanced").moe, "num_experts": moe["num_experts"]}


def test_python_api_takes_a_preset(tokenizer):
    import moefy
    from moefy.config import DataConfig
    from conftest import tiny_model

    assert moefy.presets.names() == ["balanced", "half", "fast", "sketch", "quarter", "moefication", "teal"]
    data = DataConfig(source="pydoc", seq_len=32, tokens=2048)
    m = moefy.convert(tiny_model("llama"), preset="moefication", data=data, tokenizer=tokenizer,
                      moe=presets.get("moefication").moe_config(router_steps=20, router_hidden=8))
    assert {layer.spec["expert_size"] for layer in m.layers} == {4}
    r = moefy.evaluate(m, "pydoc:heldout")  # a text spec, as `moefy eval --data`
    assert r["moe"]["active_ffn_share"] <= 0.5 and r["tokens"] > 0
    m = moefy.convert(tiny_model("llama"), preset="balanced", data=data, tokenizer=tokenizer)
    assert {layer.spec["expert_size"] for layer in m.layers} == {1}
    assert {layer.spec["router"]["kind"] for layer in m.layers} == {"quant"}
    assert m.record["moe"]["refit_down"] == 1.0


def test_teal_preset_is_input_sparsity_with_the_down_side_from_estimates(tokenizer):
    """teal: gate and up from half of each token's input channels (an unpruned sketch, read in
    full), nearly all of the budget through the sketched activations, at half the FFN's bytes."""
    import moefy
    from moefy.config import DataConfig
    from conftest import tiny_model

    data = DataConfig(source="pydoc", seq_len=32, tokens=2048)
    m = moefy.convert(tiny_model("llama"), preset="teal", data=data, tokenizer=tokenizer)
    for layer in m.layers:
        r = layer.router
        assert type(r).__name__ == "SketchRouter" and r.sparsity == 0 and r.kept == layer.spec["hidden"] // 2
        assert layer.thresholded and layer.approx_k > 5 * layer.top_k
    res = moefy.evaluate(m, "pydoc:heldout")
    assert 0.4 <= res["moe"]["executed"]["executed_bytes_share"] <= 0.55, res["moe"]["executed"]
