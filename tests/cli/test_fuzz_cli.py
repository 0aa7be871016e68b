"""Property-based: random settings and random files thrown at the CLI never show a traceback.
Every run either succeeds (exit 0) or stops with one `error:` line (exit 2), and a failed run
leaves nothing behind."""

import shutil
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moefy.cli import app

from conftest import save_tiny_llama

runner = CliRunner()
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("fuzz") / "tiny-llama", tokenizer)


def check(result, out):
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.output.strip().splitlines()[-1].startswith("error:"), result.output
        assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


@SETTINGS
@given(experts=st.sampled_from([0, 1, 2, 3, 7, 8, 16, 64, 65, 1000]),
       active=st.one_of(st.none(), st.sampled_from([-0.5, 0.0, 0.01, 0.3, 0.5, 1.0, 1.5])),
       tau=st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 0.5, 0.99, 1.0, 3.0])),
       shared=st.sampled_from([-0.1, 0.0, 0.25, 0.9, 1.0]),
       method=st.sampled_from(["random", "coactivation", "param-kmeans", "louvain"]),
       router=st.sampled_from(["similarity", "representative", "mlp", "oracle"]),
       calib_tokens=st.sampled_from([0, 10, 64, 512, 2048]),
       seq_len=st.sampled_from([-4, 0, 4, 32, 100000]))
def test_convert_settings_never_crash(folder, tmp_path, experts, active, tau, shared, method, router, calib_tokens,
                                      seq_len):
    out = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    args = ["convert", "--preset", "moefication", "--model", str(folder), "--out", str(out), "--no-eval", "--calib", "pydoc",
            "--experts", str(experts), "--shared", str(shared), "--method", method, "--router", router,
            "--calib-tokens", str(calib_tokens), "--seq-len", str(seq_len)]
    if active is not None:
        args += ["--active", str(active)]
    if tau is not None:
        args += ["--tau", str(tau)]
    check(runner.invoke(app, args), out)
    shutil.rmtree(out, ignore_errors=True)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)),
       suffix=st.sampled_from([".txt", ".jsonl", ".bin", ""]))
def test_data_files_never_crash(folder, tmp_path, content, suffix):
    data = tmp_path / f"data-{uuid.uuid4().hex[:6]}{suffix}"
    data.write_bytes(content)
    out = tmp_path / f"run-{uuid.uuid4().hex[:6]}"
    args = ["convert", "--preset", "moefication", "--model", str(folder), "--out", str(out), "--no-eval", "--calib", str(data),
            "--experts", "8", "--shared", "0", "--router", "similarity", "--calib-tokens", "64", "--seq-len", "16"]
    check(runner.invoke(app, args), out)
    shutil.rmtree(out, ignore_errors=True)


@SETTINGS
@given(top_k=st.one_of(st.none(), st.integers(-3, 12)), tau=st.one_of(st.none(), st.floats(-2, 2)),
       active=st.one_of(st.none(), st.floats(-1, 2)), tokens=st.sampled_from([0, 1, 16, 64]))
def test_eval_overrides_never_crash(folder, tmp_path_factory, top_k, tau, active, tokens):
    run = tmp_path_factory.getbasetemp() / "fuzz-run"
    if not run.exists():
        r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(folder), "--out", str(run), "--no-eval", "--calib", "pydoc",
                                "--experts", "8", "--shared", "0", "--router", "similarity", "--calib-tokens", "512",
                                "--seq-len", "32"])
        assert r.exit_code == 0, r.output
    args = ["eval", str(run), "--data", "pydoc:heldout", "--tokens", str(tokens), "--seq-len", "16"]
    for flag, value in (("--top-k", top_k), ("--tau", tau), ("--active", active)):
        if value is not None:
            args += [flag, str(value)]
    r = runner.invoke(app, args)
    assert r.exit_code in (0, 2) and "Traceback" not in r.output, r.output
