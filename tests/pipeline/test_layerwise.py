import json

import pytest
import torch
from safetensors import safe_open

import moefy
from moefy.pipeline import layerwise, load as models
from moefy.arch import FAMILIES
from moefy.config import DataConfig, MoEConfig
from moefy.errors import OutOfSpace, OutputExists, ResumeMismatch
from moefy.pipeline.blocks import block_inputs, run_layer
from moefy.pipeline.layerwise import LayerwiseConfig
from moefy.pipeline.stats import FFNStats
from moefy.pipeline.calibrate import profile

from conftest import outputs, tiny_model

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)
MOE = MoEConfig(num_experts=8, active=0.5, shared=0.0, router_steps=30, router_hidden=16)
STAT_FIELDS = ("abs_sum", "sum", "sq_sum", "marked", "coactivation", "inputs")


@pytest.fixture
def ids():
    return torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_dense_propagation_gives_the_profiled_statistics(model_type):
    """Block by block on captured inputs = one pass over the whole model, bit for bit."""
    model, family = tiny_model(model_type), FAMILIES[model_type]
    calib = torch.randint(5, 300, (6, 32), generator=torch.Generator().manual_seed(1))
    whole = profile(model, family, calib, batch_size=4, marker_share=0.25, coactivation=True, keep_inputs=150,
                    progress=False)
    states = block_inputs(model, family, calib, 4)
    for i, block in enumerate(family.block_list(model)):
        stats = FFNStats(f"layer {i}", 0.25, True, 150)
        states = run_layer(block, family, states, stats, "cpu")
        assert stats.tokens == whole[i].tokens == 192
        for name in STAT_FIELDS:
            assert torch.equal(getattr(stats, name), getattr(whole[i], name)), (i, name)


def _same_layers(a, b):
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.expert_neurons, lb.expert_neurons)
        for (name, pa), pb in zip(la.state_dict().items(), lb.state_dict().values()):
            assert torch.equal(pa, pb), name


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_layerwise_dense_equals_all_at_once(model_type, tokenizer, ids):
    a = moefy.convert(tiny_model(model_type), moe=MOE, data=DATA, tokenizer=tokenizer)
    b = moefy.convert(tiny_model(model_type), moe=MOE, data=DATA, tokenizer=tokenizer, layerwise=LayerwiseConfig())
    _same_layers(a, b)
    assert a.record["layers"] == b.record["layers"]
    assert a.record["source_weights"] == b.record["source_weights"]
    torch.testing.assert_close(outputs(b.model, ids), outputs(a.model, ids), atol=0, rtol=0)


def test_moe_propagation_trains_later_layers_on_sparse_inputs(tokenizer, ids):
    dense = moefy.convert(tiny_model("llama"), moe=MOE, data=DATA, tokenizer=tokenizer, layerwise=LayerwiseConfig())
    sparse = moefy.convert(tiny_model("llama"), moe=MOE, data=DATA, tokenizer=tokenizer,
                           layerwise=LayerwiseConfig(propagate="moe"))
    first_d, first_s = dense.layers[0].state_dict(), sparse.layers[0].state_dict()
    assert all(torch.equal(first_d[k], first_s[k]) for k in first_d)  # layer 0 sees the same inputs
    assert not torch.equal(dense.layers[1].router.fc1.weight, sparse.layers[1].router.fc1.weight)
    assert sparse.record["layerwise"]["propagate"] == "moe"
    with sparse.all_experts():  # still the same dense model underneath
        torch.testing.assert_close(outputs(sparse.model, ids), outputs(tiny_model("llama"), ids), atol=1e-4, rtol=1e-4)


def _tensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] \
        if (folder / "model.safetensors.index.json").exists() else None
    files = sorted(set(index.values())) if index else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(folder / f, "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def test_streamed_folder_equals_in_memory_conversion(tiny_folder, tmp_path, ids):
    ref = moefy.convert(models.load(str(tiny_folder)), moe=MOE, data=DATA)
    moefy.save(ref, tmp_path / "ref")
    out = layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, LayerwiseConfig(), tmp_path / "lw")
    assert not (tmp_path / "lw.partial").exists()
    a, b = _tensors(tmp_path / "ref"), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "moefy.json").read_text()) for p in (tmp_path / "ref", out))
    assert ra["assignment"] == rb["assignment"] and ra["layers"] == rb["layers"]
    assert rb["layerwise"]["loading"] == "streamed"
    torch.testing.assert_close(outputs(moefy.load(out).model, ids), outputs(moefy.load(tmp_path / "ref").model, ids),
                               atol=0, rtol=0)


class Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(tiny_folder, tmp_path):
    cfg = LayerwiseConfig(propagate="moe", offload=True)
    whole = layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, cfg, tmp_path / "whole")

    def kill_after_first(i):
        if i == 0:
            raise Killed

    target = tmp_path / "resumed"
    with pytest.raises(Killed):
        layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, cfg, target, on_layer=kill_after_first)
    partial = tmp_path / "resumed.partial"
    assert json.loads((partial / "manifest.json").read_text())["done"] == 1 and not target.exists()
    with pytest.raises(OutputExists, match="--resume"):
        layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, cfg, target)
    with pytest.raises(ResumeMismatch, match="moe"):
        layerwise.convert_to_folder(str(tiny_folder), MoEConfig(**{**MOE.to_dict(), "seed": 1}), DATA, cfg, target,
                                    resume=True)
    done = []
    layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, cfg, target, resume=True, on_layer=done.append)
    assert done == [1] and not partial.exists()
    a, b = _tensors(whole), _tensors(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "moefy.json").read_text()) for p in (whole, target))
    assert ra["layers"] == rb["layers"] and ra["assignment"] == rb["assignment"]


def test_in_memory_resume(tokenizer, tmp_path, ids):
    work = tmp_path / "work"
    whole = moefy.convert(tiny_model("gpt2"), moe=MOE, data=DATA, tokenizer=tokenizer, layerwise=LayerwiseConfig())
    with pytest.raises(Killed):
        layerwise.convert_layers(tiny_model("gpt2"), tokenizer, MOE, DATA, LayerwiseConfig(),
                                 record=whole.record, work=work, on_layer=lambda i: (_ for _ in ()).throw(Killed()))
    resumed = layerwise.convert_layers(tiny_model("gpt2"), tokenizer, MOE, DATA, LayerwiseConfig(),
                                       record=whole.record, work=work, resume=True)
    _same_layers(whole, resumed)
    torch.testing.assert_close(outputs(resumed.model, ids), outputs(whole.model, ids), atol=0, rtol=0)


def test_bf16_conversion_loads(tiny_folder, tmp_path, ids):
    out = layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, LayerwiseConfig(dtype="bf16"), tmp_path / "bf16")
    assert {t.dtype for k, t in _tensors(out).items() if "neurons" not in k} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.isfinite(outputs(moefy.load(out).model, ids)).all()


def test_free_space_is_checked_first(tiny_folder, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutOfSpace, match="GiB free"):
        layerwise.convert_to_folder(str(tiny_folder), MOE, DATA, LayerwiseConfig(), tmp_path / "out")
    m = moefy.convert(models.load(str(tiny_folder)), moe=MOE, data=DATA)
    with pytest.raises(OutOfSpace):
        moefy.save(m, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_cli_layerwise_and_moefy_run_json(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    from moefy.cli import app
    from moefy.provenance import sha256_files

    fast = ["--model", str(tiny_folder), "--calib", "pydoc", "--experts", "8", "--shared", "0", "--calib-tokens",
            "2048", "--seq-len", "32", "--eval-data", "pydoc:heldout", "--eval-tokens", "256", "--router", "similarity"]
    runner = CliRunner()
    r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, "--out", str(tmp_path / "lw"), "--layerwise", "--propagate", "moe",
                            "--offload", "--json", str(tmp_path / "lw.json")])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and not (tmp_path / "lw.partial").exists()
    r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, "--out", str(tmp_path / "whole"), "--no-eval"])
    assert r.exit_code == 0, r.output
    runs = [json.loads((tmp_path / p / "moefy_run.json").read_text()) for p in ("lw", "whole")]
    for run in runs:
        assert {"command", "settings", "seeds", "versions", "source_weights", "calibration"} <= set(run)
        assert {"torch", "transformers", "moefy"} <= set(run["versions"])
        assert run["seeds"] == {"moe": 0} and run["settings"]["moe"]["num_experts"] == 8
        assert run["source_weights"] == {"sha256": sha256_files(tiny_folder), "of": "files"}
        assert len(run["calibration"]["token_ids_sha256"]) == 64
    assert runs[0]["calibration"] == runs[1]["calibration"]
    assert runs[0]["settings"]["layerwise"]["propagate"] == "moe"
    side = json.loads((tmp_path / "lw.moefy_run.json").read_text())  # beside the --json output
    assert side["source_weights"] == runs[0]["source_weights"]
    # resume refuses other settings; layerwise flags need --layerwise
    (tmp_path / "x.partial").mkdir()
    (tmp_path / "x.partial" / "manifest.json").write_text(json.dumps({"fingerprint": {"moe": {}}, "done": 0,
                                                                      "layers": []}))
    r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, "--out", str(tmp_path / "x"), "--layerwise", "--resume"])
    assert r.exit_code == 2 and "cannot resume" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, "--out", str(tmp_path / "y"), "--dtype", "bf16"])
    assert r.exit_code == 2 and "need --layerwise" in r.output
    r = runner.invoke(app, ["convert", "--preset", "moefication", *fast, "--out", str(tmp_path / "y"), "--layerwise", "--device", "tpu"])
    assert r.exit_code == 2 and "unknown device" in r.output
