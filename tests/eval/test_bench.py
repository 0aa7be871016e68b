"""The benchmark harness runs and reports what it claims; timings are never asserted here."""

import torch
from typer.testing import CliRunner

import moefy
from moefy.eval import bench
from moefy.cli import app
from moefy.config import DataConfig, MoEConfig

from conftest import tiny_model


def converted(tokenizer):
    return moefy.convert(tiny_model("llama"), moe=MoEConfig(num_experts=8, shared=0.0, router="similarity"),
                         data=DataConfig(source="pydoc", seq_len=32, tokens=512), tokenizer=tokenizer)


def test_dense_module_and_twin_equal_all_experts(tokenizer):
    m = converted(tokenizer)
    ids = torch.randint(5, 300, (2, 16))
    twin = bench.dense_twin(m)
    with m.all_experts():
        expected = m.model(input_ids=ids).logits
    torch.testing.assert_close(twin(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(x, moefy.modeling.moe_layer.MoEFFN) for x in twin.modules())


def test_compare_interleaves_and_reports():
    calls = []
    t = bench.compare(lambda: calls.append("d"), lambda: calls.append("m"), warmup=1, iters=2, rounds=3)
    assert calls == ["d", "m"] + ["d", "d", "m", "m"] * 3
    s = t.summary()
    assert len(t.ratios) == 3 and {"dense_ms", "moe_ms", "dense_p10_ms", "moe_p90_ms", "ratio"} <= set(s)


def test_bench_cli_json(tokenizer, tmp_path):
    path = moefy.save(converted(tokenizer), tmp_path / "run")
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(path), "--output-json", str(out), "--data", "pydoc:heldout",
                                 "--input-len", "16", "--output-len", "4", "--num-iters-warmup", "1",
                                 "--num-iters", "2", "--rounds", "2", "--prefill-tokens", "64",
                                 "--prefill-layers", "2", "--lean"])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads(out.read_text())
    for key in ("ffn_batch1", "ffn_prefill", "prefill"):
        assert {"dense_ms", "moe_ms", "ratio"} <= set(res[key])
    assert {"dense_tok_s", "moe_tok_s", "speedup"} <= set(res["decode"])
    assert res["threads"] == 1 and 0 < res["active_ffn_share"] <= 0.5 + 1e-9
    assert res["ffn_batch1"]["mean_k"] > 0
    for side in ("dense", "moe"):  # where a decode step's time goes
        ms = res["step"][side]["ms"]
        assert ms["total"] > 0 and min(ms["attention"], ms["ffn"], ms["head"]) > 0
        assert abs(sum(res["step"][side]["share"].values()) - 1) < 1e-6
    assert res["decode_lean"]["cache"] == "static" and res["decode_lean"]["speedup"] > 0


def test_step_parts_find_each_module_once(tokenizer):
    from moefy.eval.step import _parts

    m = converted(tokenizer)
    for model in (m.model, bench.dense_twin(m)):
        parts = _parts(model)
        n = model.config.num_hidden_layers
        assert len(parts["ffn"]) == n and len(parts["attention"]) == n and len(parts["head"]) == 1
