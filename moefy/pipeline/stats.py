"""Streaming statistics of one FFN on calibration text (accumulated per batch in fp32): activation
rates, co-activation counts, the kept inputs the routers and refit are fitted on."""

from __future__ import annotations

import torch

from moefy.errors import NonFiniteActivations


class FFNStats:
    """Statistics of one FFN's hidden activations h [N, I] and inputs x [N, D], batch by batch.

    A neuron is *marked* on a token when its |h| is among the token's top `marker_share`
    (CMoE's activation markers; for ReLU models this approximates h > 0)."""

    def __init__(self, name: str, marker_share: float, coactivation: bool, keep_inputs: int):
        self.name = name
        self.marker_share = marker_share
        self.want_coactivation = coactivation
        self.keep_inputs = keep_inputs  # tokens of FFN inputs kept for router training
        self.tokens = 0
        self.abs_sum = self.sum = self.sq_sum = self.marked = self.coactivation = None
        self._inputs: list[torch.Tensor] = []
        self._kept = 0

    def add_batch(self, x: torch.Tensor, h: torch.Tensor):
        x, h = x.reshape(-1, x.shape[-1]).float(), h.reshape(-1, h.shape[-1]).float()
        if not (torch.isfinite(h).all() and torch.isfinite(x).all()):
            raise NonFiniteActivations(f"NaN or Inf in the FFN activations of {self.name}; "
                                       "check the model weights and --dtype")
        if self.sum is None:  # accumulators live where h is (the GPU when blocks run there)
            I = h.shape[1]
            self.abs_sum, self.sum, self.sq_sum, self.marked = (
                torch.zeros(I, dtype=torch.float64, device=h.device) for _ in range(4))
            if self.want_coactivation:
                self.coactivation = torch.zeros(I, I, device=h.device)
        self.tokens += h.shape[0]
        self.abs_sum += h.abs().sum(0, dtype=torch.float64)
        self.sum += h.sum(0, dtype=torch.float64)
        self.sq_sum += h.square().sum(0, dtype=torch.float64)
        markers = self.markers(h)  # [N, I]
        self.marked += markers.sum(0, dtype=torch.float64)
        if self.coactivation is not None:
            self.coactivation.addmm_(markers.T, markers)  # [I, I]
        if self._kept < self.keep_inputs:
            take = x[: self.keep_inputs - self._kept].to("cpu", copy=True)  # router training runs on the CPU
            self._inputs.append(take)
            self._kept += take.shape[0]

    def markers(self, h: torch.Tensor) -> torch.Tensor:
        k = max(1, round(self.marker_share * h.shape[1]))
        idx = h.abs().topk(k, dim=1).indices
        return torch.zeros_like(h).scatter_(1, idx, 1.0)

    def cpu(self) -> "FFNStats":
        for name in ("abs_sum", "sum", "sq_sum", "marked", "coactivation"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).cpu())
        return self

    @property
    def activation_rate(self) -> torch.Tensor:
        """Share of tokens on which each neuron is marked, [I]."""
        return self.marked / max(self.tokens, 1)

    @property
    def inputs(self) -> torch.Tensor:
        """The kept FFN inputs, [N, D]."""
        return torch.cat(self._inputs) if self._inputs else torch.empty(0)

    @inputs.setter
    def inputs(self, x: torch.Tensor):  # distributed.reduce: the inputs gathered from every rank
        self._inputs, self._kept = [x], x.shape[0]
