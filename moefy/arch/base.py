"""What moefy needs to know about a model family, as data: where the blocks and FFN weights live."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moefy.errors import UnsupportedModel
from moefy.modeling.activations import activation_name


@dataclass(frozen=True)
class DenseFFN:
    """One dense FFN's weights in moefy's orientation: rows are neurons.

    SwiGLU: h = act(w_in x) * (w_up x); MLP: h = act(w_in x + b_in); then y = w_out^T h + b_out."""

    kind: str                      # "swiglu" | "mlp"
    act: str                       # activation name, see moe_layer.ACTIVATIONS
    w_in: torch.Tensor             # [I, D] gate (SwiGLU) or input projection (MLP)
    w_up: torch.Tensor | None      # [I, D] up projection, SwiGLU only
    b_in: torch.Tensor | None      # [I]
    w_out: torch.Tensor            # [I, D] rows of W_out^T, one per neuron
    b_out: torch.Tensor | None     # [D]

    @property
    def width(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden(self) -> int:
        return self.w_in.shape[1]


@dataclass(frozen=True)
class Family:
    """A model family: paths are dotted attribute paths (blocks from the model, the rest from a block)."""

    name: str
    model_types: tuple[str, ...]   # config.model_type values this family covers
    blocks: tuple[str, ...]        # candidate paths to the ModuleList of blocks
    ffn: str                       # module the MoE layer replaces (its input is the FFN input)
    w_in: str                      # gate (SwiGLU) or input projection
    w_up: str | None               # up projection (SwiGLU only)
    w_out: str                     # output projection; its input is the hidden activation h
    act_attr: str                  # config attribute naming the activation ("a|b": the first one set)
    causal: bool = True            # causal LM (perplexity) or encoder
    conv1d: bool = False           # GPT-2's Conv1D stores weights as [in, out]
    identity: tuple[str, ...] = () # modules replaced by nn.Identity (BERT's output projection)

    @property
    def kind(self) -> str:
        return "swiglu" if self.w_up else "mlp"

    def blocks_path(self, model: nn.Module) -> str:
        for path in self.blocks:
            if _has(model, path):
                return path
        raise ValueError(f"{type(model).__name__}: none of {self.blocks} found for family {self.name}")

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path(model))

    def dense_ffn(self, block: nn.Module, config) -> DenseFFN:
        def linear(path):  # weight as nn.Linear stores it, [out, in], and bias
            m = block.get_submodule(path)
            w = m.weight.detach().float()
            b = getattr(m, "bias", None)
            return (w.T if self.conv1d else w), (None if b is None else b.detach().float())

        w_in, b_in = linear(self.w_in)      # [I, D]
        w_out, b_out = linear(self.w_out)   # [D, I]
        w_up = None if self.w_up is None else linear(self.w_up)[0]
        name = next((getattr(config, a) for a in self.act_attr.split("|") if getattr(config, a, None)), None)
        try:
            act = activation_name(name)
        except ValueError as exc:
            raise UnsupportedModel(str(exc)) from exc
        return DenseFFN(self.kind, act,
                        w_in.contiguous(), w_up, b_in, w_out.T.contiguous(), b_out)


def _has(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
