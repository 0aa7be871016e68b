"""`moefy analyze pregate | offload | core` and `convert --router-input previous` end to end on a tiny model."""

import json

import pytest
from typer.testing import CliRunner

from moefy.cli import app

from conftest import tiny_moe
from test_cli import FAST

runner = CliRunner()
DATA = ["--data", "pydoc:heldout"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tokenizer):
    """A tiny llama converted with small mlp routers (the CLI's 128-wide router costs more than
    the tiny FFN), saved like `moefy convert` saves it."""
    import moefy
    from conftest import tiny_model

    folder = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    moefy.save(tiny_moe(tokenizer, shared=0.0), folder / "run")  # shared 0: room for a routed expert at 25%
    return folder


def test_pregate_offload_core_commands(run_folder):
    run, pre, js = run_folder / "run", run_folder / "pre", run_folder / "pregate.json"
    r = runner.invoke(app, ["analyze", "pregate", str(run), "--calib", "pydoc", "--calib-tokens", "1024",
                            *DATA, "--tokens", "512", "--seq-len", "32", "--out", str(pre), "--json", str(js)])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert [row["active_target"] for row in rows] == [0.5, 0.25] and rows[0]["pregated"]["ppl"] > 0
    r = runner.invoke(app, ["eval", str(pre), *DATA, "--tokens", "512", "--seq-len", "32", "--active", "0.5"])
    assert r.exit_code == 0 and f"{rows[0]['pregated']['ppl']:.3f}" in r.output, r.output
    # Per-layer routers (lookahead by the pre-gated model's routers), then the pre-gated model (exact lookahead).
    for folder, extra in ((run, ["--lookahead-from", str(pre)]), (pre, [])):
        js = run_folder / f"offload-{folder.name}.json"
        r = runner.invoke(app, ["analyze", "offload", str(folder), *DATA, "--prompts", "1", "--prompt-len", "16",
                                "--new-tokens", "6", "--cache", "1", "--cache", "2", *extra,
                                "--store-dir", str(run_folder), "--json", str(js)])
        assert r.exit_code == 0, r.output
        result = json.loads(js.read_text())
        assert [(row["cache_factor"], row["policy"]) for row in result["rows"]] == [
            (1, "lru"), (1, "lru+lookahead"), (2, "lru"), (2, "lru+lookahead")]
        assert all(row["replay_matches"] for row in result["rows"][1::2])
        assert result["pregated"] == (folder == pre) and result["resident_agreement"] == 1.0
    assert not list(run_folder.glob("moefy-experts-*"))  # the expert file is removed
    js = run_folder / "core.json"
    r = runner.invoke(app, ["analyze", "core", str(run), *DATA, "--prompts", "2", "--prompt-len", "12",
                            "--cont-len", "12", "--speed-tokens", "4", "--rounds", "1", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert set(json.loads(js.read_text())["ppl"]) == {"dense", "routed", "core"}


@pytest.mark.parametrize("args,message", [
    (["offload", "--cache", "0.5"], "--cache"),
    (["core", "--budget", "all"], "--budget"),
    (["pregate", "--active", "0"], "active share"),
    (["offload", "--lookahead-from", "RUN"], "not a pre-gated model"),
])
def test_analysis_errors(run_folder, args, message):
    cmd, *rest = args
    rest = [str(run_folder / "run") if a == "RUN" else a for a in rest]
    r = runner.invoke(app, ["analyze", cmd, str(run_folder / "run"), *rest])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_convert_router_input_previous_needs_mlp(run_folder):
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(run_folder / "tiny"), "--out", str(run_folder / "pg"), *FAST,
                            "--router-input", "previous", "--router", "similarity"])
    assert r.exit_code == 2 and "--router-input previous" in r.output and not (run_folder / "pg").exists()
