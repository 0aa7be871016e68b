"""Saved folders in the ecosystem. Marked `compat` (with the trust_remote_code tests in
test_convert / test_sparse_expansion): `make test` runs them on the newest transformers and again
on the oldest we support. lm-evaluation-harness (the `eval` extra) is scored on a local task."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from typer.testing import CliRunner

import moefy
from moefy.cli import app
from moefy.config import DataConfig, MoEConfig
from moefy.pipeline.data import documents

from conftest import tiny_model

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny llama converted with an MLP router and shared neurons, saved."""
    moe = MoEConfig(num_experts=8, active=0.6, shared=0.25, router="mlp", router_steps=20, router_hidden=8)
    m = moefy.convert(tiny_model("llama"), moe=moe, data=DATA, tokenizer=tokenizer)
    return moefy.save(m, tmp_path_factory.mktemp("compat") / "run")


@pytest.mark.compat
def test_generate_with_plain_transformers(saved):
    """Greedy decoding with the KV cache through the remote code equals moefy.load's, token for token."""
    prompt = torch.tensor([[5, 17, 42, 99, 7, 250]])
    ours = moefy.load(saved).model.generate(prompt, max_new_tokens=12, do_sample=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
    assert type(hf).__name__ == "MoefyLlamaForCausalLM"
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(theirs, ours) and theirs.shape[1] == 18


def test_lm_eval_scores_a_local_task(saved, tmp_path):
    """HFLM(pretrained=folder, trust_remote_code=True) on a task written by `moefy lm-eval-task`
    gives the byte perplexity computed directly from the model's log-probabilities."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional `eval` extra")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = [d[:300].strip() for d in documents("pydoc:heldout")[:4]]  # each fits one 256-token window
    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = CliRunner().invoke(app, ["lm-eval-task", str(text), "--out", str(tmp_path / "tasks")])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {tmp_path / 'tasks'}") and "--tasks moefy_heldout" in r.output

    lm = HFLM(pretrained=str(saved), trust_remote_code=True, batch_size=2, device="cpu")
    assert type(lm.model).__name__ == "MoefyLlamaForCausalLM"
    out = simple_evaluate(model=lm, tasks=["moefy_heldout"], task_manager=TaskManager(
        include_path=str(tmp_path / "tasks"), include_defaults=False))
    result = out["results"]["moefy_heldout"]

    model, tok = moefy.load(saved).model, lm.tokenizer
    ll = 0.0
    for doc in docs:
        ids = [lm.prefix_token_id, *tok(doc, add_special_tokens=False)["input_ids"]]
        assert len(ids) <= lm.max_length
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        ll += float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    n_bytes = sum(len(d.encode()) for d in docs)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert result["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)
    assert result["word_perplexity,none"] > result["byte_perplexity,none"] > 1


def test_lm_eval_task_errors(tmp_path):
    (tmp_path / "taken").mkdir()
    for args, message in [(["pydoc:heldout", "--out", str(tmp_path / "taken")], "--overwrite"),
                          (["nope.txt", "--out", str(tmp_path / "t")], "no text source"),
                          (["pydoc", "--out", str(tmp_path / "t"), "--name", "a b"], "task name")]:
        r = CliRunner().invoke(app, ["lm-eval-task", *args])
        assert r.exit_code == 2 and r.output.startswith("error:") and message in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_remote_code_imports_every_runtime_module():
    """transformers before 4.57 copies a saved folder's remote code only as deep as
    modeling_moefy.py's own imports: it must name every module of moefy/modeling."""
    import ast
    from pathlib import Path

    import moefy.modeling

    folder = Path(moefy.modeling.__file__).parent
    tree = ast.parse((folder / "modeling_moefy.py").read_text())
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "modeling_moefy"}
    assert modules <= imported, sorted(modules - imported)
