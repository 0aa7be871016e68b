"""Expert selection from router scores: fixed top-k or D2DMoE's dynamic-k.

# T tokens, E routed experts, K selected experts per token, P selected (token, expert) pairs
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts(scores: torch.Tensor, top_k: int | None, tau: float | None) -> torch.Tensor:
    """Boolean mask [T, E] of the experts each token uses.

    Fixed top-k, or D2DMoE's dynamic-k: keep expert e iff score_e >= (1 - tau) * max score
    (scores clamped at 0, at least one expert per token; top_k, when also given, caps k)."""
    if tau is None:
        idx = scores.topk(top_k, dim=-1).indices  # [T, K]
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    s = scores.clamp_min(0)
    mask = (s >= (1.0 - tau) * s.amax(dim=-1, keepdim=True)) & (s > 0)
    mask |= F.one_hot(scores.argmax(-1), scores.shape[-1]).bool()
    if top_k is not None and top_k < scores.shape[-1]:
        kth = s.topk(top_k, dim=-1).values[:, -1:]
        mask &= s >= kth
    return mask


def _flat(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids of every token, flat [P], token offsets [T + 1]) of a selection mask [T, E]."""
    return mask.nonzero()[:, 1].contiguous(), F.pad(mask.sum(1).cumsum(0), (1, 0))
