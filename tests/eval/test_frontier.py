"""The speed frontier on a tiny model: every preset converted and measured on two domains with
decode / prefill timings; a bad preset name is refused before any work."""

import json

from typer.testing import CliRunner

from moefy.cli import app
from moefy.eval import frontier

from conftest import save_tiny_llama

runner = CliRunner()
TIMING = dict(warmup=1, iters=2, rounds=1, input_len=16, output_len=4, prefill_tokens=64, prefill_layers=1)


def test_frontier_rows_measure_quality_cost_and_speed(tmp_path, tokenizer):
    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    rows = frontier.frontier(str(dense), ["balanced", "sketch"], calib_tokens=2048, eval_tokens=256,
                             timing=TIMING)
    assert [r["preset"] for r in rows] == ["balanced", "sketch"]
    for r in rows:
        assert set(r["quality"]) == set(frontier.DOMAINS)
        assert all(q["ppl_ratio"] > 0.5 and q["tokens"] > 0 for q in r["quality"].values())
        assert 0 < r["executed"]["executed_bytes_share"] < 1
        assert r["speed"]["decode"]["speedup"] > 0 and r["speed"]["prefill"]["ratio"] > 0
        assert r["ceiling"] > 1.0  # fewer FFN bytes than dense: the ceiling is above dense speed
    table = frontier.markdown(rows)
    assert table.count("\n") == 3 and "balanced" in table and "sketch" in table
    frontier.plot(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_frontier_command_refuses_an_unknown_preset(tmp_path):
    out = tmp_path / "f"
    r = runner.invoke(app, ["frontier", "--out", str(out), "--preset", "balanced", "--preset", "nope"])
    assert r.exit_code == 2 and "unknown preset 'nope'" in r.output, r.output
    assert not out.exists()


def test_frontier_command_writes_its_files(tmp_path, tokenizer, monkeypatch):
    dense = save_tiny_llama(tmp_path / "dense", tokenizer)
    real = frontier.frontier
    monkeypatch.setattr(frontier, "frontier", lambda *a, **k: real(*a, **{**k, "timing": TIMING}))
    out = tmp_path / "f"
    r = runner.invoke(app, ["frontier", "--out", str(out), "--model", str(dense), "--preset", "half",
                            "--calib-tokens", "2048", "--eval-tokens", "256"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "frontier.json").read_text())["rows"][0]["preset"] == "half"
    assert (out / "frontier.png").exists() and "half" in (out / "frontier.md").read_text()
