import json

import pytest
from typer.testing import CliRunner

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.cli import app
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError
from moefy.eval.sweep import Variant, markdown, measured, sweep

from conftest import tiny_model

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)
FAST = MoEConfig(router_steps=30, router_hidden=16)


def test_sweep_rows_follow_the_budget(tokenizer):
    loaded = models.LoadedModel(tiny_model("llama"), tokenizer, "tiny")
    heldout = data_mod.blocks("pydoc:heldout", tokenizer, 32, max_tokens=256)
    variants = [Variant("coactivation", "mlp", 0.0, 8), Variant("random", "similarity", 0.25, 8)]
    rows = sweep(loaded, variants, [0.5, 1.0, 0.2], heldout, FAST, DATA, oracle=True)
    assert [(r["variant"], r["active_target"]) for r in rows] == [
        (v.label(), a) for v in variants for a in (0.2, 0.5, 1.0)]
    # 20% is below the floor of the variant with 25% shared neurons: skipped, with the reason.
    assert "skipped" in rows[3] and "no room" in rows[3]["skipped"]
    for v in variants:
        pts = [r for r in rows if r["variant"] == v.label() and "skipped" not in r]
        flops = [r["moe"]["ffn_flops_per_token"] for r in pts]
        assert len(pts) >= 2 and flops == sorted(flops)  # more budget, more compute
        assert all(r["moe"]["active_ffn_share"] <= r["active_target"] + 1e-9 for r in pts)
        assert all("oracle" in r and r["oracle"]["ppl_ratio"] > 0 for r in pts)
    dense = [r["dense"] for r in rows if "dense" in r]
    assert all(d == dense[0] for d in dense)  # one dense reference for the whole sweep
    assert markdown(rows).count("\n") == len(measured(rows)) + 2  # header, rule, dense, then one line a point


def test_sweep_checks_every_variant_before_profiling(tokenizer):
    loaded = models.LoadedModel(tiny_model("llama"), tokenizer, "tiny")
    with pytest.raises(ConfigError, match="divide"):
        sweep(loaded, [Variant(experts=8), Variant("coactivation", "mlp", 0.0, 7)], [0.5], None, FAST, DATA)
    with pytest.raises(ConfigError, match="active"):
        sweep(loaded, [Variant(experts=8)], [0.0], None, FAST, DATA)
    with pytest.raises(ConfigError, match="method:router:shared:experts"):
        Variant.parse("coactivation:mlp")


def test_sweep_cli_writes_json_plot_and_table(tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_folder), "--out", str(out), "--variant", "coactivation:similarity:0:8",
            "--active", "0.5", "--active", "1", "--calib", "pydoc", "--calib-tokens", "2048", "--seq-len", "32",
            "--eval-data", "pydoc:heldout", "--eval-tokens", "256"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "sweep.json").read_text())
    assert [r["active_target"] for r in result["rows"]] == [0.5, 1.0]
    assert all(r["ppl_ratio"] > 0 and r["moe"]["active_ffn_share"] <= r["active_target"] for r in result["rows"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dense |" in (out / "sweep.md").read_text()
    run = json.loads((out / "moefy_run.json").read_text())
    assert run["command"] == "sweep" and len(run["source_weights"]["sha256"]) == 64
    assert len(run["calibration"]["token_ids_sha256"]) == 64 and "torch" in run["versions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(app, [*args[:5], "--variant", "nonsense", "--overwrite"])
    assert r.exit_code == 2 and "method:router:shared:experts" in r.output
