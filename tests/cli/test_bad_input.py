"""Bad input through the CLI (issue 6, part 6): damaged moefy folders, damaged dense folders, a
tokenizer from another model, GGUF files we cannot load, empty or binary text, NaN weights. Each
gives one `error:` line saying what to change, exit code 2, and writes nothing."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from moefy.cli import app

from conftest import save_tiny_llama

runner = CliRunner()
FAST = ["--calib", "pydoc", "--experts", "8", "--shared", "0", "--router", "similarity", "--calib-tokens", "512",
        "--seq-len", "32", "--no-eval"]
EVAL = ["--data", "pydoc:heldout", "--tokens", "64", "--seq-len", "16"]


def fails(args, message, tmp_path, out=None):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert out is None or not out.exists()
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left behind


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("bad") / "dense", tokenizer)


@pytest.fixture(scope="module")
def run(dense):
    out = dense.parent / "run"
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(dense), "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path):  # bytes inside the safetensors JSON header
    raw = bytearray(path.read_bytes())
    middle = 8 + int.from_bytes(raw[:8], "little") // 2
    raw[middle:middle + 4] = b"\x00\x01{]"
    path.write_bytes(bytes(raw))


def _drop_layer(path):  # config.moefy describes fewer layers than the model has
    config = json.loads(path.read_text())
    config["moefy"]["layers"] = config["moefy"]["layers"][:1]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name,damage,message", [
    ("model.safetensors", _truncate, "damaged or incomplete"),
    ("model.safetensors", _garble_header, "SafetensorError"),
    ("model.safetensors", lambda p: p.unlink(), "model.safetensors"),
    ("config.json", _truncate, "not a valid JSON"),
    ("config.json", _drop_layer, "describes 1 layers, the model has 2"),
    ("moefy.json", _truncate, "cannot read"),
    ("tokenizer.json", lambda p: p.write_text("{}"), "cannot load"),
])
def test_damaged_moefy_folder(run, tmp_path, name, damage, message):
    folder = shutil.copytree(run, tmp_path / "run")
    damage(folder / name)
    for command in (["eval", str(folder), *EVAL, "--json", str(tmp_path / "e.json")], ["bench", str(folder)]):
        fails(command, message, tmp_path, tmp_path / "e.json")


def test_damaged_dense_folder(dense, tmp_path):
    folder = shutil.copytree(dense, tmp_path / "dense")
    _truncate(folder / "model.safetensors")
    fails(["convert", "--preset", "moefication", "--model", str(folder), "--out", str(tmp_path / "o"), *FAST], "complete", tmp_path,
          tmp_path / "o")


def test_tokenizer_of_another_model(dense, run, tokenizer, tmp_path):
    """Token ids past the embedding would be an IndexError in the forward pass; caught at load."""
    bigger = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>")
    bigger.add_tokens([f"word{i}" for i in range(40)])
    for src in (dense, run):
        folder = shutil.copytree(src, tmp_path / src.name)
        bigger.save_pretrained(folder)
        command = (["eval", str(folder), *EVAL] if src is run else
                   ["convert", "--preset", "moefication", "--model", str(folder), "--out", str(tmp_path / "o"), *FAST])
        fails(command, "does not belong to this model", tmp_path, tmp_path / "o")
    fails(["prune", str(tmp_path / "dense"), "--out", str(tmp_path / "o"), "--no-eval"], "embedding has 320 rows",
          tmp_path, tmp_path / "o")


def _gguf(path, arch, tensors=True):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if tensors:
        w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_we_cannot_load(tmp_path):
    out = tmp_path / "o"
    fails(["convert", "--preset", "moefication", "--model", str(_gguf(tmp_path / "f.gguf", "falcon")), "--out", str(out)],
          "GGUF architecture 'falcon' is not supported; supported: bert, gemma, gemma2, gemma3, gpt2, llama", tmp_path, out)
    fails(["convert", "--preset", "moefication", "--model", str(_gguf(tmp_path / "l.gguf", "llama", tensors=False)), "--out", str(out)],
          "cannot load", tmp_path, out)
    (tmp_path / "t.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    fails(["convert", "--preset", "moefication", "--model", str(tmp_path / "t.gguf"), "--out", str(out)], "not a readable GGUF", tmp_path, out)


@pytest.mark.parametrize("content,message", [(b"", "holds no text"), (b"\n\n  \n\n", "holds no text"),
                                             (bytes(range(256)) * 8, "looks binary"),
                                             ("café".encode("latin-1") * 50, "not UTF-8"),
                                             (b"too short", "fewer than the 32 needed")])
def test_empty_binary_or_short_text(dense, run, tmp_path, content, message):
    data = tmp_path / "calib.txt"
    data.write_bytes(content)
    args = ["--model", str(dense), "--out", str(tmp_path / "o"), *FAST, "--calib", str(data)]
    fails(["convert", "--preset", "moefication", *args], message, tmp_path, tmp_path / "o")
    fails(["eval", str(run), "--data", str(data), "--seq-len", "32"], message, tmp_path)


def test_token_count_below_what_the_router_needs(dense, tmp_path):
    args = ["convert", "--preset", "moefication", "--model", str(dense), "--out", str(tmp_path / "o"), *FAST, "--router", "mlp",
            "--calib-tokens", "1024", "--active", "1"]
    fails(args, "1024 tokens requested from 'pydoc', fewer than the 2048 needed", tmp_path, tmp_path / "o")


def test_nan_weights_name_the_layer(dense, tmp_path):
    folder = shutil.copytree(dense, tmp_path / "nan")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    fails(["convert", "--preset", "moefication", "--model", str(folder), "--out", str(tmp_path / "o"), *FAST], "FFN activations of layer 1",
          tmp_path, tmp_path / "o")
    fails(["prune", str(folder), "--out", str(tmp_path / "o"), "--calib", "pydoc", "--calib-tokens", "256",
           "--seq-len", "32", "--no-eval"], "FFN inputs of layer 1", tmp_path, tmp_path / "o")


def test_calibration_inputs_that_do_not_fit_in_memory(dense, tmp_path, monkeypatch):
    import psutil

    class Memory:  # the tiny model's 512 tokens keep 512 x hidden x 4 bytes a layer: more than 1 KiB
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory)
    fails(["convert", "--preset", "moefication", "--model", str(dense), "--out", str(tmp_path / "o"), *FAST],
          "lower --calib-tokens, or add --layerwise", tmp_path, tmp_path / "o")
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(dense), "--out", str(tmp_path / "lw"), *FAST, "--layerwise"])
    assert r.exit_code == 0, r.output  # one layer at a time: the check is the all-at-once path's


def test_memory_check_counts_every_layer(dense):
    from moefy.arch import family_for
    from moefy.pipeline.calibrate import check_memory
    from moefy.errors import OutOfMemory
    from moefy.pipeline.load import load

    model = load(str(dense)).model
    family = family_for(model.config)
    blocks = family.block_list(model)
    per_token = 4 * family.dense_ffn(blocks[0], model.config).hidden * len(blocks)
    check_memory(model, 100, available=100 * per_token)  # exactly fits
    with pytest.raises(OutOfMemory, match="100 calibration tokens keep"):
        check_memory(model, 100, available=100 * per_token - 1)
