"""Hugging Face integration of moefy models (shipped into every saved folder as remote code).

A saved folder's config.json names `Moefy<BaseClass>` (e.g. MoefyLlamaForCausalLM) in
`architectures` and `auto_map`; this module makes that class on demand: the transformers base
class whose FFN modules are replaced by MoEFFN layers built from `config.moefy`. So both
`moefy.load(folder)` and `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
give the same model. Imports torch and transformers only.
"""

from __future__ import annotations

import torch
import transformers

from .moe_layer import MoEFFN, link_pregated
from .sparse_ffn import TYPE as SPARSE_EXPANSION, SparseExpertFFN
# transformers before huggingface/transformers#46022 (4.56 among them) copies a local folder's
# remote code into its module cache only as deep as this file's own imports: name every module.
from .activations import ACTIVATIONS  # noqa: F401
from .compiled import _kernels  # noqa: F401
from .cost import FlopCount  # noqa: F401
from .paths import ExpertPaths  # noqa: F401
from .routers import ROUTERS  # noqa: F401
from .router_mlp import MLPRouter  # noqa: F401
from .router_representative import RepresentativeRouter  # noqa: F401
from .router_similarity import SimilarityRouter  # noqa: F401
from .router_sketch import SketchRouter  # noqa: F401
from .selection import select_experts  # noqa: F401
from .router_quant import QuantRouter  # noqa: F401

PREFIX = "Moefy"


def install_moe(model: torch.nn.Module, cfg: dict, layers: list[MoEFFN] | None = None):
    """Replace every block's FFN by its MoEFFN (given, or built empty from the specs in `cfg`;
    a spec of type "sparse_expansion" builds a SparseExpertFFN)."""
    blocks = model.get_submodule(cfg["blocks"])
    if len(blocks) != len(cfg["layers"]):
        raise ValueError(f"config.moefy describes {len(cfg['layers'])} layers, the model has {len(blocks)}")
    layers = layers if layers is not None else [layer_from_spec(spec) for spec in cfg["layers"]]
    # the config holds each layer's own spec dict, so a selection changed after loading
    # (set_active, set_routing, set_router_input) is what save_pretrained writes
    cfg["layers"] = [layer.spec for layer in layers]
    for block, layer in zip(blocks, layers):
        block.set_submodule(cfg["ffn"], layer)
        for path in cfg.get("identity", []):
            block.set_submodule(path, torch.nn.Identity())
    link_pregated(layers)


def layer_from_spec(spec: dict) -> torch.nn.Module:
    return SparseExpertFFN(spec) if spec.get("type") == SPARSE_EXPANSION else MoEFFN(spec)


_CLASSES: dict[str, type] = {}


def moefy_class(base: type) -> type:
    """The subclass of a transformers model class whose FFNs are MoEFFN layers."""
    name = PREFIX + base.__name__
    if name not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            install_moe(self, config.moefy)

        def from_pretrained(cls, *args, **kwargs):
            model = base.from_pretrained.__func__(cls, *args, **kwargs)
            own_memory(model)
            return model

        _CLASSES[name] = type(name, (base,), {"__init__": __init__, "from_pretrained": classmethod(from_pretrained),
                                              "__module__": __name__})
    return _CLASSES[name]


@torch.no_grad()
def own_memory(model: torch.nn.Module):
    """Copy every tensor into freshly allocated memory. Tensors read from safetensors sit at
    the file's offsets; MKL's GEMM rounds differently at different alignments, so without this a
    loaded model's logits differ from the converted model's in the last bits."""
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()


def base_class(name: str) -> type:
    base = getattr(transformers, name.removeprefix(PREFIX), None)
    if not isinstance(base, type):
        raise ValueError(f"unknown transformers model class {name.removeprefix(PREFIX)!r}")
    return base


def __getattr__(name: str):  # PEP 562: `from modeling_moefy import MoefyLlamaForCausalLM`
    if name.startswith(PREFIX):
        return moefy_class(base_class(name))
    raise AttributeError(name)
