import json

import pytest
from typer.testing import CliRunner

from moefy.cli import app

runner = CliRunner()
FAST = ["--calib", "pydoc", "--experts", "8", "--shared", "0", "--calib-tokens", "2048", "--seq-len", "32",
        "--eval-data", "pydoc:heldout", "--eval-tokens", "512"]


def test_convert_then_eval(tiny_folder, tmp_path):
    out, js = tmp_path / "run", tmp_path / "eval.json"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(out), "--router", "similarity", *FAST])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and (out / "model.safetensors").exists()
    r = runner.invoke(app, ["eval", str(out), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "32",
                            "--json", str(js)])
    assert r.exit_code == 0, r.output
    result = json.loads(js.read_text())
    assert set(result) >= {"dense", "moe", "tokens"}
    assert {"ppl", "ffn_flops_per_token"} <= set(result["dense"])
    assert {"ppl", "ffn_flops_per_token", "active_ffn_share"} <= set(result["moe"])
    assert result["moe"]["active_ffn_share"] <= 0.5
    r = runner.invoke(app, ["eval", str(out), "--json", str(js)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = runner.invoke(app, ["eval", str(out), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "32",
                            "--top-k", "8"])
    assert r.exit_code == 0 and "(1.00x)" in r.output, r.output


@pytest.mark.parametrize("args,message", [
    (["--experts", "7"], "divide"),
    (["--active", "0"], "active share"),
    (["--tau", "-1"], "tau"),
    (["--method", "louvain"], "unknown method"),
    (["--calib", "/no/such/file.txt"], "no text source"),
    (["--calib-tokens", "40"], "fewer than"),
    (["--router", "sketch", "--router-channels", "0"], "router channels"),
])
def test_bad_settings_one_line_exit_2(tiny_folder, tmp_path, args, message):
    out = tmp_path / "run"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(out), *FAST, *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_models(tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 20)
    cases = [(str(tmp_path / "missing"), "no model"), (str(gguf), "GGUF"), (str(tmp_path), "config.json")]
    for model, message in cases:
        r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", model, "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and message in r.output, r.output


def test_existing_output_is_kept(tiny_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(out), *FAST])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_eval_of_a_non_moefy_folder(tiny_folder):
    r = runner.invoke(app, ["eval", str(tiny_folder)])
    assert r.exit_code == 2 and "moefy" in r.output


def test_record_names_the_source(tiny_folder, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(out), "--no-eval", "--router", "similarity", *FAST])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "moefy.json").read_text())["source"] == str(tiny_folder)


def test_sketch_channels_change_after_loading(tiny_folder, tmp_path):
    """A sketch router's channel share is a setting, like --active: eval can change it, and an
    similarity-routed model refuses it with one line."""
    out, js = tmp_path / "run", tmp_path / "eval.json"
    wide = ["--experts", "64", "--shared", "0", "--calib", "pydoc", "--calib-tokens", "2048", "--seq-len", "32",
            "--no-eval"]
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(out), "--router", "sketch", *wide])
    assert r.exit_code == 0, r.output
    shares = {}
    for channels in ("0.25", "1.0"):
        r = runner.invoke(app, ["eval", str(out), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "32",
                                "--router-channels", channels, "--active", "0.75", "--json", str(js), "--overwrite"])
        assert r.exit_code == 0, r.output
        shares[channels] = json.loads(js.read_text())["moe"]["active_ffn_share"]
    assert shares["0.25"] <= 0.75 and shares["1.0"] <= 0.75  # the router's cost is counted either way
    plain = tmp_path / "plain"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(plain), "--router", "sketch",
                            "--no-router-reuse", *wide])
    assert r.exit_code == 0, r.output
    options = [json.loads((d / "config.json").read_text())["moefy"]["layers"][0]["router"]["options"] for d in (out, plain)]
    assert options[0]["reuse"] is True and options[1]["reuse"] is False
    counts = {}
    for flag in ("--no-router-reuse", "--router-reuse"):  # eval overrides it; the recorded share is applied again
        r = runner.invoke(app, ["eval", str(plain if flag == "--router-reuse" else out), "--data", "pydoc:heldout",
                                "--tokens", "512", "--seq-len", "32", flag, "--json", str(js), "--overwrite"])
        assert r.exit_code == 0, r.output
        report = json.loads(js.read_text())
        assert report["moe"]["active_ffn_share"] <= 0.5 + 0.05, report["moe"]  # thresholds: the mean count is fitted
        counts[flag] = report["moe"]["active_neuron_share"]
    assert counts["--router-reuse"] > counts["--no-router-reuse"]  # cheaper selected neurons: more of them
    r = runner.invoke(app, ["eval", str(out), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "32",
                            "--router-approx", "0.3", "--active", "0.75", "--json", str(js), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["moe"]["active_ffn_share"] <= 0.75  # the sketched experts are counted
    approx = tmp_path / "approx"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(approx), "--router", "sketch",
                            "--router-approx", "0.25", *wide])
    assert r.exit_code == 0, r.output
    assert json.loads((approx / "config.json").read_text())["moefy"]["layers"][0]["router"]["options"]["approx"] == 0.25
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(tmp_path / "bad"), "--router-approx",
                            "0.3", *FAST, "--no-eval"])
    assert r.exit_code == 2 and "--router-approx" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    topk = tmp_path / "topk"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(topk), "--router", "sketch",
                            "--router-top-k", *wide])
    assert r.exit_code == 0, r.output
    assert json.loads((topk / "config.json").read_text())["moefy"]["layers"][0]["router"]["options"]["threshold"] is False
    assert json.loads((out / "config.json").read_text())["moefy"]["layers"][0]["router"]["options"]["threshold"] is True
    r = runner.invoke(app, ["eval", str(topk), "--router-threshold"])
    assert r.exit_code == 2 and "--router-threshold" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["eval", str(out), "--data", "pydoc:heldout", "--tokens", "512", "--seq-len", "32",
                            "--router-top-k", "--active", "0.75", "--json", str(js), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["moe"]["active_ffn_share"] <= 0.75  # the same top-k everywhere: within the share
    mlp = tmp_path / "mlp"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--out", str(mlp), *FAST, "--router", "similarity", "--no-eval"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", str(mlp), "--router-channels", "0.5"])
    assert r.exit_code == 2 and "sketch routers" in r.output and len(r.output.strip().splitlines()) == 1, r.output
