"""Tiny random models for every registered family, and a small local tokenizer (no hub)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

from moefy.arch import FAMILIES
from moefy.pipeline.data import pydoc_documents

VOCAB = 320


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>", "[CLS]", "[SEP]", "[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_documents()[:40], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                                pad_token="[PAD]")


def tiny_config(model_type: str):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=1, pad_token_id=4)
    if model_type in ("llama", "mistral", "qwen2"):
        cls = transformers.AutoConfig.for_model(model_type).__class__
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if model_type in ("gemma", "gemma2", "gemma3_text"):
        cls = transformers.AutoConfig.for_model(model_type).__class__
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **common)
    if model_type == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, n_inner=64, **common)
    if model_type == "bert":
        return transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=256, **common)
    raise KeyError(model_type)


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    auto = transformers.AutoModelForCausalLM if FAMILIES[model_type].causal else transformers.AutoModel
    model = auto.from_config(config).eval().requires_grad_(False)
    with torch.no_grad():  # larger random matrices, so outputs are far from trivially equal
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


MODEL_TYPES = sorted(FAMILIES)


@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


def save_tiny_llama(path, tokenizer):
    """A tiny llama saved as a Hugging Face folder at `path`, with the tokenizer."""
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    return save_tiny_llama(tmp_path / "tiny-llama", tokenizer)


@torch.no_grad()  # with autograd on, MoEFFN takes its torch path (the kernels have no backward)
def outputs(model, ids, sparse=True):
    """Logits of a causal LM, the last hidden state of an encoder. `sparse`: every token through
    the MoE layers' sparse paths, as scoring runs (no dense prompt path: MoEFFN.sparse_only)."""
    layers = [m for m in model.modules() if hasattr(m, "sparse_only")] if sparse else []
    for layer in layers:
        layer.sparse_only = True
    try:
        out = model(input_ids=ids)
    finally:
        for layer in layers:
            layer.sparse_only = False
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer):
    """A tiny llama converted to 8 experts at 50% and saved: a folder for the commands that read runs."""
    import moefy
    from moefy.config import DataConfig, MoEConfig

    m = moefy.convert(tiny_model("llama"), tokenizer=tokenizer,
                      moe=MoEConfig(num_experts=8, active=0.5, shared=0.0, router_steps=30, router_hidden=16),
                      data=DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16))
    return moefy.save(m, tmp_path_factory.mktemp("runs") / "tiny-moe")


TINY_MOE = dict(num_experts=8, active=0.5, shared=0.25, router_steps=30, router_hidden=16)  # a small mlp router


def tiny_moe(tokenizer, **kw):
    """A tiny llama converted with small mlp routers on pydoc (a few seconds)."""
    import moefy
    from moefy.config import DataConfig, MoEConfig

    return moefy.convert(tiny_model("llama"), moe=MoEConfig(**{**TINY_MOE, **kw}),
                         data=DataConfig(source="pydoc", seq_len=32, tokens=2048, batch_size=16), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_moe(tokenizer):
    """tiny_moe with per-layer routers, shared by the tests (restore what you change)."""
    return tiny_moe(tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_pregated(tokenizer):
    """tiny_moe with pre-gated routers (router_input="previous")."""
    return tiny_moe(tokenizer, router_input="previous")
