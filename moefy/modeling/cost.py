"""FLOP accounting of an MoE layer, in one place: what a token's selection costs, router and shared
neurons included (2 FLOPs per multiply-add), and the top-k that fits a budget.

# D hidden, E routed experts, n neurons per expert
"""

from __future__ import annotations

import math

from .router_sketch import SketchRouter


class FlopCount:
    """The FLOP accounting of MoEFFN (a mixin: it reads the layer's weights, spec and router)."""

    def reset_counters(self):
        self.tokens_seen = 0
        self.experts_selected = 0
        self.sketched_selected = 0  # sketched experts (a sketch router's approx share)

    @property
    def matrices(self) -> int:
        return 3 if self.gated else 2

    def dense_flops_per_token(self) -> int:
        E, n, D = self.w_in.shape
        return 2 * self.matrices * D * (E * n + self.spec["shared"])

    def flops_per_token(self, mean_k: float, mean_sketched: float | None = None) -> float:
        """FFN FLOPs for a token that uses `mean_k` experts, router included (multiply-adds x 2),
        plus `mean_sketched` sketched experts (default approx_k: a sketch router's approx share)."""
        sketched = self.approx_k if mean_sketched is None else mean_sketched
        return self._fixed_flops() + mean_k * self._expert_flops() + sketched * self._approx_flops()

    def _fixed_flops(self) -> float:
        """The router and the shared neurons."""
        return self.router.flops_per_token() + 2 * self.matrices * self.w_in.shape[2] * self.spec["shared"]

    def _expert_flops(self) -> float:
        """One exact routed expert (less the sums it reuses from a sketch router)."""
        E, n, D = self.w_in.shape
        saved = n * self.router.reused_flops_per_neuron() if isinstance(self.router, SketchRouter) else 0
        return 2 * self.matrices * D * n - saved

    def _approx_flops(self) -> float:
        """One sketched expert: its down rows times the sketched activations."""
        E, n, D = self.w_in.shape
        return 2 * D * n

    @property
    def approx_share(self) -> float:
        return self.router.approx if isinstance(self.router, SketchRouter) else 0.0

    @property
    def approx_k(self) -> int:
        """Sketched experts per token (sketch router with an approx share a, fixed top-k): the
        experts ranked top_k+1 ... top_k+approx_k by the sketch add their sketched activations
        through their down rows. approx_k spends a / (1 - a) of what the top_k exact experts
        cost, so a share's budget splits (1 - a) exact, a sketched (top_k_for_share)."""
        a = self.approx_share
        if not a or self.top_k is None or self.tau is not None:
            return 0
        k_b = math.floor(a / (1 - a) * self.top_k * self._expert_flops() / self._approx_flops() + 1e-9)
        return max(0, min(k_b, self.spec["num_experts"] - self.top_k))

    def top_k_for_share(self, active: float) -> int:
        """The largest k whose FFN FLOPs (router and shared neurons included) stay within `active`
        times the dense FFN's (at most every expert; below 1 when even one does not fit). With a
        sketch router's approx share a, k takes (1 - a) of the experts' budget (see approx_k)."""
        budget = (active * self.dense_flops_per_token() - self._fixed_flops()) / self._expert_flops()
        k = math.floor((1 - self.approx_share) * budget + 1e-9)
        return min(k, self.spec["num_experts"])

    def mean_k(self) -> float:
        return self.experts_selected / max(self.tokens_seen, 1)

    def mean_sketched(self) -> float:
        """Sketched experts per token seen (approx_k before any)."""
        return self.sketched_selected / self.tokens_seen if self.tokens_seen else float(self.approx_k)

    # -- executed cost ----------------------------------------------------------------------------
    # What the path a decode step takes (one token per call) really reads and computes, router
    # included: no saving is counted that no path executes (a pruned sketch's zeros are read and
    # multiplied, a sketch's sums are not reused).

    def decode_cost(self, mean_k: float | None = None, mean_sketched: float | None = None) -> dict:
        """Per token at decode: weight bytes read and FLOPs executed (2 per multiply-add), the
        router's share of each, and the dense FFN's, for `mean_k` exact and `mean_sketched`
        sketched experts (default: the counts measured since reset_counters)."""
        k = self.mean_k() if mean_k is None else mean_k
        kb = self.mean_sketched() if mean_sketched is None else mean_sketched
        E, n, D = self.w_in.shape
        size = self.w_in.element_size()
        gu = 2 if self.gated else 1  # gate and up (or the input matrix alone)
        router_floats, router_flops = self._router_cost()
        # A selected neuron reads its whole rows: no path saves a sketch's reused sums (the kernels
        # add the channels left as a full dot with the kept ones zeroed, experts.cpp; a pruned
        # sketch's sums are not reused at all), so reuse is counted only in active_ffn_share.
        expert_floats = n * (gu + 1) * D
        floats = router_floats + k * expert_floats + kb * n * D + self.spec["shared"] * D * (gu + 1)
        flops = router_flops + 2 * (k * expert_floats + kb * n * D + self.spec["shared"] * D * (gu + 1))
        dense = (E * n + self.spec["shared"]) * D * (gu + 1)
        return {"bytes": floats * size, "flops": flops, "router_bytes": router_floats * size,
                "router_flops": router_flops, "dense_bytes": dense * size, "dense_flops": 2 * dense}

    def _router_cost(self) -> tuple[float, float]:
        """(weight floats read, FLOPs) of the router for one token."""
        r, (E, n, D) = self.router, self.w_in.shape
        if hasattr(r, "bytes_per_token"):  # the quantised router: its 4-bit copy, int8 products
            mats = 2 if self.gated else 1
            return r.bytes_per_token() / self.w_in.element_size(), 2 * mats * E * n * D + 2 * E * n * n
        if isinstance(r, SketchRouter):
            rows = r.kept * E * n * (2 if self.gated else 1)  # the kept channels' rows, pruned zeros included
            score = E if n == 1 else E * n * n  # down-row norms, or each expert's Gram matrix
            return rows + score, 2 * rows + 2 * score
        floats = sum(p.numel() for p in r.parameters())
        return floats, 2 * floats
