import copy
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import moefy
from moefy.cli import app
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError
from moefy.eval.evaluate import perplexity
from moefy.pipeline.route import router_objective, router_targets
from moefy.tuning import distill as tuning
from moefy.tuning.distill import TuneConfig, fingerprint, tune
from moefy.tuning.params import check_memory, memory_needed, trainable_parameters

from conftest import outputs, tiny_model

DATA = DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16)
MOE = MoEConfig(num_experts=8, active=0.5, shared=0.25, router_steps=30, router_hidden=16)


def cfg(**kw):
    return TuneConfig(**{"data": "pydoc:calib", "seq_len": 32, "batch_size": 2, "minutes": None, "tokens": 64 * 12,
                         "lr": 3e-3, "warmup": 2, **kw})


@pytest.fixture(scope="module")
def base(tokenizer):
    m = moefy.convert(tiny_model("llama"), moe=MOE, data=DATA, tokenizer=tokenizer)
    m.set_dense_prompt_from(None)  # these tests compare the sparse function on many tokens
    return m


@pytest.fixture
def converted(base):
    return copy.deepcopy(base)


@pytest.fixture
def ids():
    return torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def kl(logits, dense) -> float:
    return float(F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(dense, -1).flatten(0, 1),
                          log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("tau", [None, 0.4])
def test_training_path_is_the_inference_function(converted, ids, tau):
    """The masked path (autograd on, weights trainable) computes what the sparse paths compute,
    and only the selected experts receive gradients."""
    if tau is not None:
        converted.set_routing(tau=tau)
    layer = converted.layers[0]
    x = torch.randn(2, 24, layer.spec["hidden"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer(x)
    layer.requires_grad_(True)
    try:
        y = layer(x)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
        y.square().sum().backward()
        used = layer.route(x.reshape(-1, x.shape[-1])).any(0)  # [E]
        grad_rows = layer.w_in.grad.abs().sum((1, 2)) > 0
        assert torch.equal(grad_rows, used)
        assert layer.router.fc1.weight.grad is None  # routers are not trained through the mask
    finally:
        layer.requires_grad_(False)


def test_tuning_brings_the_moe_model_closer_to_dense(converted, tokenizer):
    held = moefy.pipeline.data.blocks("pydoc:heldout", tokenizer, 32, max_tokens=1024)
    routers = {n: p.clone() for n, p in converted.model.named_parameters() if ".router." in n}
    with converted.all_experts():
        dense = outputs(converted.model, held)
    before = kl(outputs(converted.model, held), dense)
    record = tune(converted, cfg(tokens=64 * 40, routers=False))
    after = kl(outputs(converted.model, held), dense)
    assert record["steps"] == 40 and record["tokens_seen"] == 64 * 40
    assert record["kl_last_10_steps"] < record["kl_first_10_steps"]
    assert after < 0.8 * before, (before, after)
    for n, p in converted.model.named_parameters():  # routers untouched, nothing left trainable
        assert not p.requires_grad
        if n in routers:
            assert torch.equal(p, routers[n])
    assert converted.record["tuning"]["fingerprint"]


def test_hidden_state_error_is_relative_and_token_by_token():
    t = [torch.randn(2, 5, 8) for _ in range(3)]
    assert float(tuning.hidden_state_error(t, t)) == 0.0
    s = [t[0], 1.1 * t[1], t[2]]  # layer 1 off by 10% everywhere, layer 2 exact: (0.01 + 0) / 2
    torch.testing.assert_close(tuning.hidden_state_error(s, t), torch.tensor(0.005))
    big = [x.clone() for x in t]
    for x in big:
        x[:, 0] *= 1e3  # a token with huge states weighs as much as any other
    s = [x.clone() for x in big]
    s[1][:, 1] += big[1][:, 1]  # token 1 of layer 1 off by 100%: 2 of 10 tokens, 1 of 2 layers
    torch.testing.assert_close(tuning.hidden_state_error(s, big), torch.tensor(0.1))


def test_hidden_loss_matches_the_teacher_layer_by_layer(base, tokenizer):
    """--hidden-loss: the hidden-state term is optimised with the KL, so it falls further than
    under the KL alone, the KL still falls, and the record carries both."""
    held = moefy.pipeline.data.blocks("pydoc:heldout", tokenizer, 32, max_tokens=512)
    plain, layered = copy.deepcopy(base), copy.deepcopy(base)
    tune(plain, cfg(tokens=64 * 30, routers=False))
    record = tune(layered, cfg(tokens=64 * 30, routers=False, hidden_loss=10.0))
    assert record["hidden_last_10_steps"] < record["hidden_first_10_steps"]
    assert record["kl_last_10_steps"] < record["kl_first_10_steps"]
    assert "hidden_first_10_steps" not in plain.record["tuning"]

    with torch.no_grad(), base.all_experts():  # the dense model (base is never tuned)
        dense = base.model(input_ids=held, output_hidden_states=True).hidden_states

    def error(m):
        with torch.no_grad():
            return float(tuning.hidden_state_error(m.model(input_ids=held, output_hidden_states=True).hidden_states, dense))

    assert error(layered) < error(plain)


def router_objective_on(m, ids) -> float:
    """Mean over layers of each router's conversion objective on the model's own layer inputs."""
    losses = []
    for layer, x in zip(m.layers, m.layer_inputs(ids)):
        kind, objective = router_objective(layer)
        losses.append(float(objective(layer.router.logits(x), router_targets(layer, x, kind))))
    return sum(losses) / len(losses)


def test_routers_refit_online(base, tokenizer):
    """--routers: the routers keep learning their conversion objective on the tuned model's own
    inputs, so on held-out text they fit the tuned experts better than routers left as they were;
    the distillation still works and nothing stays trainable."""
    held = moefy.pipeline.data.blocks("pydoc:heldout", tokenizer, 32, max_tokens=1024)
    fixed, refit = copy.deepcopy(base), copy.deepcopy(base)
    tune(fixed, cfg(tokens=64 * 40, routers=False))
    record = tune(refit, cfg(tokens=64 * 40, router_lr=3e-3))  # the default for mlp routers
    assert record["routers"] is True
    assert record["router_loss_last_10_steps"] < record["router_loss_first_10_steps"]
    assert record["kl_last_10_steps"] < record["kl_first_10_steps"]
    assert router_objective_on(refit, held) < 0.9 * router_objective_on(fixed, held)
    changed = [n for (n, a), (_, b) in zip(base.model.named_parameters(), refit.model.named_parameters())
               if not torch.equal(a, b)]
    assert any(".router." in n for n in changed) and all(".mlp." in n for n in changed)
    assert not any(p.requires_grad for p in refit.model.parameters())
    assert not any(layer._forward_hooks for layer in refit.layers)


def test_what_is_trained(converted):
    ffn = trainable_parameters(converted, "ffn")
    assert ffn and all(".mlp." in n and ".router." not in n for n in ffn)
    every = trainable_parameters(converted, "all")
    assert set(ffn) < set(every)
    assert any("self_attn" in n for n in every) and not any("embed" in n or ".router." in n for n in every)


def test_other_lr_sets_the_rate_of_attention_and_norms(converted, base):
    tune(converted, cfg(train="all", other_lr=1e-8))
    delta = {n: (a - b).abs().max().item() for (n, a), (_, b)
             in zip(converted.model.named_parameters(), base.model.named_parameters())}
    ffn = trainable_parameters(base, "ffn")
    others = [n for n in trainable_parameters(base, "all") if n not in ffn]
    assert any("self_attn" in n for n in others)
    assert max(delta[n] for n in ffn) > 1e-3          # the experts learn at lr 3e-3
    assert max(delta[n] for n in others) < 1e-5       # attention and norms at 1e-8: AdamW moves them ~1e-8 a step


def test_other_lr_needs_train_all():
    with pytest.raises(ConfigError, match="--train all"):
        cfg(other_lr=1e-4).validate()
    with pytest.raises(ConfigError, match="other-lr"):
        cfg(train="all", other_lr=2.0).validate()


class Stop(Exception):
    pass


@pytest.mark.parametrize("routers", [False, True])
def test_resume_after_a_kill_gives_the_uninterrupted_result(tokenizer, tmp_path, routers):
    def fresh():
        return moefy.convert(tiny_model("llama"), moe=MOE, data=DATA, tokenizer=tokenizer)

    def cfg(**kw):
        return globals()["cfg"](routers=routers, **kw)

    whole = fresh()
    tune(whole, cfg(), checkpoint=tmp_path / "a")

    killed = fresh()

    def kill(step, _loss):
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        tune(killed, cfg(checkpoint_minutes=1e-9), checkpoint=tmp_path / "b", on_step=kill)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 6
    resumed = fresh()  # a new process would load the untuned model again
    record = tune(resumed, cfg(checkpoint_minutes=1e-9), checkpoint=tmp_path / "b", resume=True)
    assert record["steps"] == whole.record["tuning"]["steps"]
    for (n, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n

    other = fresh()
    with pytest.raises(ConfigError, match="fingerprint"):
        tune(other, cfg(lr=1e-3), checkpoint=tmp_path / "b", resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        tune(other, cfg(), checkpoint=tmp_path / "none", resume=True)


def test_resume_keeps_the_hidden_state_history(tokenizer, tmp_path):
    """With --hidden-loss the term's per-step values are checkpointed too: a resumed run records
    the uninterrupted run's first and last steps; the setting is part of the fingerprint."""
    def fresh():
        return moefy.convert(tiny_model("llama"), moe=MOE, data=DATA, tokenizer=tokenizer)

    settings = dict(routers=False, hidden_loss=2.0, tokens=64 * 24)
    whole = tune(fresh(), cfg(**settings))

    def kill(step, _loss):
        if step == 15:
            raise Stop

    with pytest.raises(Stop):
        tune(fresh(), cfg(checkpoint_minutes=1e-9, **settings), checkpoint=tmp_path / "c", on_step=kill)
    resumed = tune(fresh(), cfg(checkpoint_minutes=1e-9, **settings), checkpoint=tmp_path / "c", resume=True)
    for key in ("hidden_first_10_steps", "hidden_last_10_steps", "kl_first_10_steps", "kl_last_10_steps"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
    m = fresh()
    assert fingerprint(m, cfg(hidden_loss=1.0), torch.zeros(1, 8, dtype=torch.long)) != \
        fingerprint(m, cfg(), torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("bad,match", [(dict(minutes=None, tokens=None), "budget"), (dict(tokens=10), "at least one step"),
                                       (dict(train="router"), "--train"), (dict(lr=0.0), "learning rate"),
                                       (dict(precision="fp16"), "--precision"), (dict(hidden_loss=-1.0), "--hidden-loss")])
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**bad).validate()


def test_encoders_are_refused(tokenizer):
    m = moefy.convert(tiny_model("bert"), moe=MoEConfig(num_experts=8, shared=0, router="similarity"), data=DATA,
                      tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="causal"):
        tune(m, cfg())


def test_cli_tune_then_eval_against_the_source(tiny_folder, tmp_path):
    runner = CliRunner()
    run, out = tmp_path / "moe", tmp_path / "tuned"
    common = ["--seq-len", "32", "--eval-data", "pydoc:heldout", "--eval-tokens", "256"]
    r = runner.invoke(app, ["convert", "--preset", "moefication", "--model", str(tiny_folder), "--calib", "pydoc", "--experts", "8",
                            "--shared", "0", "--router", "similarity",
                            "--calib-tokens", "2048", "--out", str(run), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["tune", str(run), "--out", str(out), "--data", "pydoc:calib", "--tokens", "640",
                            "--batch-size", "2", "--lr", "3e-3", "--json", str(tmp_path / "t.json"), *common])
    assert r.exit_code == 0, r.output
    assert "KL" in r.output and not (tmp_path / "tuned.tuning").exists()
    result = json.loads((tmp_path / "t.json").read_text())
    source = moefy.pipeline.load.load(str(tiny_folder))
    blocks = moefy.pipeline.data.blocks("pydoc:heldout", source.tokenizer, 32, max_tokens=256)
    assert result["dense"]["ppl"] == pytest.approx(perplexity(source.model, blocks)[0], rel=1e-6)
    tuned = moefy.load(out)
    assert tuned.record["tuning"]["steps"] == 10
    r = runner.invoke(app, ["tune", str(run), "--out", str(out), "--tokens", "4096"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["tune", str(run), "--out", str(run), "--tokens", "4096"])
    assert r.exit_code == 2 and "must differ" in r.output
    r = runner.invoke(app, ["tune", str(run), "--out", str(tmp_path / "r"), "--tokens", "4096", "--routers"])
    assert r.exit_code == 2 and "mlp routers" in r.output and not (tmp_path / "r").exists()


def test_score_thresholds_are_fitted_again_after_tuning(tokenizer):
    """A sketch model with score thresholds (the default): tuning selects by them, and at the end
    fits each layer's score quantiles again on the tuned model's own inputs, so the thresholds
    give the budget's mean counts with the tuned weights."""
    m = moefy.convert(tiny_model("llama"), moe=MoEConfig(num_experts=64, active=0.5, shared=0.0, router="sketch"),
                      data=DATA, tokenizer=tokenizer)
    assert all(layer.thresholded for layer in m.layers)
    before = [layer.thresholds() for layer in m.layers]
    record = tune(m, cfg(tokens=64 * 6, lr=1e-2))
    assert record["score_quantiles_refit_tokens"] > 0
    assert [layer.thresholds() for layer in m.layers] != before
    blocks = moefy.pipeline.data.blocks("pydoc:calib", tokenizer, 32, max_tokens=1024)
    for layer in m.layers:
        layer.reset_counters()
    with torch.no_grad(), m.sparse_only():
        m.model(input_ids=blocks)
    for layer in m.layers:  # the refit read these tokens: the mean counts are the targets
        assert layer.mean_k() == pytest.approx(layer.top_k, rel=0.05)


def test_precision_follows_the_cpu_features(tmp_path, monkeypatch):
    """auto is bf16 only where the CPU lists native bf16 products: elsewhere bf16 is emulated and
    about 200x slower than fp32 (PERF.md). An explicit choice is kept."""
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert tuning.cpu_has_bf16(str(with_bf16)) and not tuning.cpu_has_bf16(str(without))
    assert not tuning.cpu_has_bf16(str(tmp_path / "missing"))
    cpu = torch.device("cpu")
    for has, auto in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(tuning, "cpu_has_bf16", lambda has=has: has)
        assert tuning.resolve_precision("auto", cpu) == auto
        assert tuning.resolve_precision("fp32", cpu) == "fp32" and tuning.resolve_precision("bf16", cpu) == "bf16"


def test_bf16_tuning_keeps_fp32_weights_and_learns_like_fp32(base, tokenizer):
    """bf16 autocast runs the products in bf16 while weights and updates stay fp32; the tuning it
    gives is close to fp32's (the same held-out KL to dense within 10%), and the record says
    which precision ran. A checkpoint of one precision is not resumed by the other."""
    held = moefy.pipeline.data.blocks("pydoc:heldout", tokenizer, 32, max_tokens=1024)
    with base.all_experts():
        dense = outputs(base.model, held)
    before = kl(outputs(base.model, held), dense)
    after = {}
    for precision in ("fp32", "bf16"):
        m = copy.deepcopy(base)
        record = tune(m, cfg(tokens=64 * 40, routers=False, precision=precision))
        assert record["precision"] == precision == m.record["tuning"]["precision"]
        assert all(p.dtype == torch.float32 for p in m.model.parameters())
        after[precision] = kl(outputs(m.model, held), dense)
    assert after["bf16"] < 0.8 * before and after["fp32"] < 0.8 * before, (before, after)
    assert abs(after["bf16"] - after["fp32"]) < 0.1 * after["fp32"], after
    blocks = moefy.pipeline.data.blocks("pydoc:calib", tokenizer, 32)
    assert fingerprint(base, cfg(precision="fp32"), blocks) != fingerprint(base, cfg(precision="bf16"), blocks)


def test_a_pruned_sketch_measures_its_density_again_after_tuning(tokenizer):
    """The pruning masks follow the tuned weights, so the density that prices the sketch is
    measured again on the tuned model's inputs; the channel norms stay the conversion's."""
    m = moefy.convert(tiny_model("llama"), moe=MoEConfig(num_experts=64, active=0.5, shared=0.0, router="sketch",
                                                         router_sparsity=0.5), data=DATA, tokenizer=tokenizer)
    norms = [layer.router.channel_norms.clone() for layer in m.layers]
    density = [layer.router.density.clone() for layer in m.layers]
    record = tune(m, cfg(tokens=64 * 6, lr=1e-2))
    assert record["score_quantiles_refit_tokens"] > 0
    assert all(torch.equal(a, layer.router.channel_norms) for a, layer in zip(norms, m.layers))
    assert any(not torch.equal(d, layer.router.density) for d, layer in zip(density, m.layers))


def test_a_quantised_router_copies_the_tuned_weights(tokenizer):
    """Tuning changes gate and up: the quantised router's 4-bit copy is made again from them, so
    its estimate ranks with the weights the experts compute."""
    from moefy.modeling.router_quant import dequantize

    m = moefy.convert(tiny_model("llama"), moe=MoEConfig(num_experts=64, active=0.5, shared=0.0, router="quant"),
                      data=DATA, tokenizer=tokenizer)
    tune(m, cfg(tokens=64 * 6, lr=1e-2))
    for layer in m.layers:
        E, n, D = layer.w_in.shape
        err = dequantize(layer.router.q_in, layer.router.s_in) - layer.w_in.reshape(E * n, D)
        assert float(err.abs().max()) <= float(layer.router.s_in.max()) / 2 + 1e-6


def test_down_rows_alone_learn_with_train_down(converted, base):
    """--train down: only the experts' and shared neurons' down rows change, and the masked path
    carries their gradients (the gate and up rows do not require grad)."""
    down = trainable_parameters(base, "down")
    assert down and all(n.endswith(("w_out", "shared_out")) for n in down)
    tune(converted, cfg(train="down", routers=False))
    delta = {n: (a - b).abs().max().item() for (n, a), (_, b)
             in zip(converted.model.named_parameters(), base.model.named_parameters())}
    assert max(delta[n] for n in down) > 1e-3
    assert all(v == 0 for n, v in delta.items() if n not in down)


def test_recompute_gives_the_same_steps(base):
    """Gradient checkpointing recomputes each block in the backward pass: the same updates, and
    the blocks' own forward again afterwards."""
    plain, again = copy.deepcopy(base), copy.deepcopy(base)
    tune(plain, cfg(tokens=64 * 3, routers=False, precision="fp32"))
    tune(again, cfg(tokens=64 * 3, routers=False, precision="fp32", recompute=True))
    for (n, a), (_, b) in zip(plain.model.named_parameters(), again.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    blocks = again.model.get_submodule(again.family.blocks_path(again.model))
    assert all("forward" not in vars(block) for block in blocks)


def test_a_run_that_cannot_fit_is_refused_before_any_work(converted):
    need = memory_needed(converted, cfg())
    assert need["gradients and optimizer"] == 3 * sum(p.numel() * 4 for p in trainable_parameters(converted, "ffn").values())
    small = memory_needed(converted, cfg(train="down", recompute=True, batch_size=1))
    assert small["gradients and optimizer"] < need["gradients and optimizer"] and small["activations"] < need["activations"]
    with pytest.raises(ConfigError, match="--train down, --recompute, a smaller --batch-size"):
        check_memory(converted, cfg(), available=sum(need.values()) - 1)
    check_memory(converted, cfg(), available=sum(need.values()))
