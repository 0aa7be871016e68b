"""CMoE's representative-neuron router (training-free).

# T tokens, D hidden, E routed experts
"""

import torch.nn.functional as F
from torch import nn
import torch

from .activations import ACTIVATIONS, activation_name


class RepresentativeRouter(nn.Module):
    """CMoE's training-free router: each expert's representative neuron r scores the token with
    |act(w_in,r x + b_r) * (w_up,r x)| (the up factor only for gated FFNs)."""

    def __init__(self, hidden: int, num_experts: int, gated: bool = True, act: str = "silu",
                 bias: bool = False, **_):
        super().__init__()
        self.act = activation_name(act)
        self.w_in = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w_up = nn.Parameter(torch.zeros(num_experts, hidden)) if gated else None
        self.b_in = nn.Parameter(torch.zeros(num_experts)) if bias else None

    def forward(self, x):
        h = ACTIVATIONS[self.act](F.linear(x, self.w_in, self.b_in))  # [T, E]
        if self.w_up is not None:
            h = h * (x @ self.w_up.T)
        return h.abs()

    def flops_per_token(self) -> int:
        return 2 * self.w_in.numel() * (2 if self.w_up is not None else 1)
