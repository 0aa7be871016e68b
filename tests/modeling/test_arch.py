import pytest
import torch
from types import SimpleNamespace

from moefy.arch import FAMILIES, family_for
from moefy.errors import UnsupportedModel
from moefy.modeling.activations import ACTIVATIONS

from conftest import tiny_model


def test_dense_ffn_reproduces_the_module(model_type):
    """The extracted weights, applied by moefy's formula, give the model's own FFN output."""
    model = tiny_model(model_type)
    family = FAMILIES[model_type]
    block = family.block_list(model)[0]
    ffn = family.dense_ffn(block, model.config)
    x = torch.randn(5, model.config.hidden_size)
    h = ACTIVATIONS[ffn.act](x @ ffn.w_in.T + (0 if ffn.b_in is None else ffn.b_in))
    if ffn.w_up is not None:
        h = h * (x @ ffn.w_up.T)
    y = h @ ffn.w_out + (0 if ffn.b_out is None else ffn.b_out)
    if family.identity:  # BERT: intermediate then output.dense
        expected = block.output.dense(block.intermediate(x))
    else:
        expected = block.get_submodule(family.ffn)(x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_unknown_family_lists_supported():
    with pytest.raises(UnsupportedModel, match="llama.*") as e:
        family_for(SimpleNamespace(model_type="t5"))
    for name in ("bert", "gpt2", "llama", "mistral", "qwen2"):
        assert name in str(e.value)
