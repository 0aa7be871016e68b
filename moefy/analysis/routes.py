"""The experts a converted model selects, token by token: the raw material of the routing analyses
(consistency.py, specialisation.py, the usage heatmaps of `moefy report`).

Only routed experts count; shared neurons are computed for every token and never cached or chosen.

# B blocks, L tokens per block, E routed experts, N layers
"""

from __future__ import annotations

import torch

from moefy.model import MoEModel


@torch.no_grad()
def routing_masks(m: MoEModel, blocks: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per MoE layer, which experts each token of `blocks` [B, L] selects, bool [B, L, E].

    The model runs in its current MoE mode, so each layer routes the input that the sparse model
    itself gives it (earlier layers sparse too), with its current top-k or tau."""
    B, L = blocks.shape
    out: list[list[torch.Tensor]] = [[] for _ in m.layers]
    for batch in blocks.split(batch_size):
        for masks, layer, x in zip(out, m.layers, m.layer_inputs(batch)):
            masks.append(layer.route(x).view(len(batch), L, -1))  # [b, L, E]
    return [torch.cat(masks) for masks in out]


def usage(masks: list[torch.Tensor]) -> torch.Tensor:
    """Selection frequency of every expert, the share of tokens that select it, [N, E] (layers
    with different expert counts are padded with NaN)."""
    E = max(mask.shape[-1] for mask in masks)
    freq = torch.full((len(masks), E), float("nan"))
    for i, mask in enumerate(masks):
        freq[i, :mask.shape[-1]] = mask.flatten(0, 1).float().mean(0)
    return freq


def mean_k(mask: torch.Tensor) -> float:
    """Mean experts selected per token."""
    return float(mask.flatten(0, 1).sum(-1).float().mean())
