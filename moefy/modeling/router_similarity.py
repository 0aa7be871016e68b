"""MoEfication's similarity router (training-free).

# T tokens, D hidden, E routed experts
"""

import torch
from torch import nn


class SimilarityRouter(nn.Module):
    """MoEfication's training-free router: score_e = <c_e, x> with c_e the mean of the expert's
    L2-normalised input rows, passed through a softmax so scores are non-negative (monotone, so
    top-k is unchanged)."""

    def __init__(self, hidden: int, num_experts: int, **_):
        super().__init__()
        self.centres = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, x):
        return torch.softmax(x @ self.centres.T, dim=-1)  # [T, E]

    def flops_per_token(self) -> int:
        return 2 * self.centres.numel()
