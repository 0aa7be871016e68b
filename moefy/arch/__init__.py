"""Model families, keyed by `config.model_type`. Adding a family is one small file plus one line here."""

from moefy.errors import UnsupportedModel
from moefy.arch.base import DenseFFN, Family
from moefy.arch.bert import BERT
from moefy.arch.gemma import GEMMA
from moefy.arch.gpt2 import GPT2
from moefy.arch.llama import LLAMA

FAMILIES: dict[str, Family] = {t: f for f in (LLAMA, GEMMA, GPT2, BERT) for t in f.model_types}


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"unsupported architecture {model_type!r}; moefy supports: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


__all__ = ["DenseFFN", "Family", "FAMILIES", "UnsupportedModel", "family_for"]
