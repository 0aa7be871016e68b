"""Data-parallel calibration on CPU with gloo and 2 processes gives what one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from moefy.pipeline import distributed
from moefy.arch import family_for
from moefy.cli import app
from moefy.pipeline.calibrate import profile

from conftest import tiny_config, tiny_model

BATCH, KEEP = 8, 400  # 5 batches of 8 x 16 tokens: rank 0 gets 2 batches (256 tokens), rank 1 gets 3
PROFILE = dict(batch_size=BATCH, marker_share=0.25, coactivation=True, keep_inputs=KEEP, progress=False)


def _profile_rank(rank, blocks, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        model = tiny_model("llama")
        stats = distributed.reduce(profile(model, family_for(model.config),
                                           distributed.shard(blocks, BATCH), **PROFILE))
        torch.save([(s.tokens, s.abs_sum, s.sum, s.sq_sum, s.marked, s.coactivation, s.inputs) for s in stats],
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_profile_like_one(tmp_path):
    """Counts and kept inputs bit for bit; the fp64 sums up to their order of addition."""
    blocks = torch.randint(5, 300, (40, 16), generator=torch.Generator().manual_seed(0))
    mp.spawn(_profile_rank, args=(blocks, tmp_path), nprocs=2)
    model = tiny_model("llama")
    one = profile(model, family_for(model.config), blocks, **PROFILE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for layer, st in enumerate(one):
        for tokens, abs_sum, sum_, sq_sum, marked, coactivation, inputs in (r[layer] for r in ranks):
            assert tokens == st.tokens == 640
            assert torch.equal(marked, st.marked) and torch.equal(coactivation, st.coactivation)
            assert torch.equal(inputs, st.inputs) and inputs.shape == (KEEP, 32)
            for got, want in ((abs_sum, st.abs_sum), (sum_, st.sum), (sq_sum, st.sq_sum)):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_torchrun_convert_equals_one_process(tmp_path, tokenizer):
    """`torchrun --nproc-per-node 2 -m moefy convert` writes (rank 0 only) the model one process
    writes: the same neuron-to-expert assignment and bit-identical weights, trained routers included."""
    folder = tmp_path / "wide-llama"  # FFN width 256, so the default 128-wide MLP router fits the budget
    config = tiny_config("llama")
    config.intermediate_size = 256
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = ["convert", "--preset", "moefication", "--model", str(folder), "--no-eval", "--calib", "pydoc", "--experts", "16", "--shared", "0.125",
            "--active", "0.6", "--router", "mlp", "--calib-tokens", "2048", "--seq-len", "32"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "moefy", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved") == 1  # rank 0 writes, rank 1 only calibrates
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two", "wide-llama"]
    one, two = (json.loads((tmp_path / d / "moefy.json").read_text()) for d in ("one", "two"))
    assert two["calibration"]["processes"] == 2 and one["calibration"]["processes"] == 1
    assert two["assignment"] == one["assignment"] and two["layers"] == one["layers"]
    w1, w2 = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys() and any("router" in k for k in w1)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
