"""A trained 2-layer MLP router (D2DMoE norm regression, MoEfication BCE).

# T tokens, D hidden, E routed experts, H router hidden width
"""

import torch
import torch.nn.functional as F
from torch import nn


class MLPRouter(nn.Module):
    """A 2-layer MLP router. output="norm": it predicts each expert's output norm ||E_e(x)||_2
    (D2DMoE); "log-norm": the same norm, regressed as log(1 + norm); "probability": sigmoid of
    logits trained with BCE on MoEfication's targets."""

    def __init__(self, hidden: int, num_experts: int, router_hidden: int = 128, output: str = "norm", **_):
        super().__init__()
        self.output = output
        self.fc1 = nn.Linear(hidden, router_hidden)
        self.fc2 = nn.Linear(router_hidden, num_experts)

    def logits(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # [T, E]

    def forward(self, x):
        out = self.logits(x)
        if self.output == "probability":
            return torch.sigmoid(out)
        return torch.expm1(out.clamp(max=30.0)) if self.output == "log-norm" else out

    def flops_per_token(self) -> int:
        return 2 * (self.fc1.weight.numel() + self.fc2.weight.numel())
