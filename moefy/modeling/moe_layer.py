"""The MoE FFN module: a router plus expert-major expert weights, a drop-in for a dense FFN.

The modules of this folder import torch (and transformers) only: they are copied into every saved
moefy folder so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works
without moefy. The layer holds the weights and the selection settings; the router (routers.py, one
module per kind) scores the experts; the execution paths (paths.py) compute the selected ones; the
FLOP accounting is in cost.py.

# T tokens, D hidden, I ffn width, E routed experts, n neurons per expert, S shared neurons,
# K selected experts per token, H router hidden width
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import ACTIVATIONS, activation_name
from .compiled import KERNEL_FUSED_MAX_TOKENS, _kernels
from .cost import FlopCount
from .paths import ExpertPaths
from .router_mlp import MLPRouter
from .router_quant import QuantRouter
from .router_sketch import SketchRouter
from .routers import ROUTERS
from .selection import select_experts


class MoEFFN(FlopCount, ExpertPaths, nn.Module):
    """Sparse drop-in replacement for a dense FFN (SwiGLU or biased MLP).

    The dense FFN's I neurons are split into S shared neurons (always computed) and E routed
    experts of n neurons each, stored expert-major: w_in[e] holds the input rows of expert e,
    w_out[e] the matching rows of W_out^T. With every expert active the output is strictly
    equivalent to the dense FFN (same weights, neurons permuted). In MoE mode only the selected
    experts' weights are read and multiplied; nothing computes the dense FFN and masks it.

    `spec` is a plain dict (it is stored in the model config), see `MoEFFN.make_spec`.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        D, E, n, S = spec["hidden"], spec["num_experts"], spec["expert_size"], spec["shared"]
        self.gated = spec["kind"] == "swiglu"
        self.act = activation_name(spec["act"])
        self.top_k = spec.get("top_k")
        self.tau = spec.get("tau")
        self.all_experts = False  # True: compute every expert (the exact dense FFN)
        self.sparse_only = False  # True: never the dense prompt path (scoring runs every token as decode does)
        self.oracle = False  # True: route by the true expert output norms (analysis only: costs a dense FFN)
        empty = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731
        self.w_in = empty(E, n, D)
        self.w_up = empty(E, n, D) if self.gated else None
        self.b_in = empty(E, n) if spec["bias_in"] else None
        self.w_out = empty(E, n, D)
        self.b_out = empty(D) if spec["bias_out"] else None
        self.shared_in = empty(S, D) if S else None
        self.shared_up = empty(S, D) if S and self.gated else None
        self.shared_b_in = empty(S) if S and spec["bias_in"] else None
        self.shared_out = empty(S, D) if S else None
        self.register_buffer("expert_neurons", torch.zeros(E, n, dtype=torch.long))
        self.register_buffer("shared_neurons", torch.zeros(S, dtype=torch.long))
        r = spec["router"]
        self.router = ROUTERS[r["kind"]](D, E, gated=self.gated, act=self.act, bias=spec["bias_in"],
                                         expert_size=n, **r.get("options", {}))
        if isinstance(self.router, SketchRouter):
            self.router.__dict__["layer"] = self
        self._mlp_router = isinstance(self.router, MLPRouter)
        # The compiled sketch paths complete the sketch's sums; a pruned sketch's are completed
        # (with the weights it dropped) only in the FLOP count: see SketchRouter.
        self._sketch_reuse = isinstance(self.router, SketchRouter) and self.router.reuse and not self.router.sparsity
        # The quantised router's estimate has no partial sums: its kernel path completes "empty" ones
        # (every selected neuron from all of x) with the sketched experts in the same call.
        self._quant = isinstance(self.router, QuantRouter)
        # "previous": the router reads the previous layer's FFN input (Pre-gated MoE, Hwang et al.
        # 2024), which that layer hands over in its forward (see link_pregated).
        self.router_input = spec.get("router_input", "own")
        self._fused_router = self._mlp_router and self.router_input == "own"  # the kernels run it with the experts
        self.__dict__["_feeds"] = None  # the next layer, when it is pre-gated (not a submodule)
        self._router_x = None  # [T, D]: the previous layer's input, for a pre-gated router
        self.reset_counters()

    @staticmethod
    def make_spec(*, kind, hidden, num_experts, expert_size, shared, act, bias_in, bias_out,
                  router, top_k=None, tau=None) -> dict:
        return dict(kind=kind, hidden=hidden, num_experts=num_experts, expert_size=expert_size,
                    shared=shared, act=activation_name(act), bias_in=bias_in, bias_out=bias_out,
                    router=router, top_k=top_k, tau=tau)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, ffn, shared: torch.Tensor, experts: torch.Tensor, router: dict,
                   top_k: int | None = None, tau: float | None = None) -> "MoEFFN":
        """Build from a dense FFN (rows = neurons, see arch.DenseFFN), the shared neuron ids [S]
        and the routed experts' neuron ids [E, n]. The router is left untrained."""
        E, n = experts.shape
        spec = cls.make_spec(kind=ffn.kind, hidden=ffn.hidden, num_experts=E, expert_size=n,
                             shared=len(shared), act=ffn.act, bias_in=ffn.b_in is not None,
                             bias_out=ffn.b_out is not None, router=router, top_k=top_k, tau=tau)
        moe = cls(spec)
        for routed, shared_name, dense in (("w_in", "shared_in", ffn.w_in), ("w_up", "shared_up", ffn.w_up),
                                           ("b_in", "shared_b_in", ffn.b_in), ("w_out", "shared_out", ffn.w_out)):
            if dense is not None:
                getattr(moe, routed).copy_(dense[experts])
                if len(shared):
                    getattr(moe, shared_name).copy_(dense[shared])
        if ffn.b_out is not None:
            moe.b_out.copy_(ffn.b_out)
        moe.expert_neurons.copy_(experts)
        moe.shared_neurons.copy_(shared)
        return moe

    def set_selection(self, top_k: int | None, tau: float | None):
        """Fixed top-k, or dynamic-k with tau (top_k then caps k); kept in the spec that is saved."""
        self.top_k, self.tau = top_k, tau
        self.spec.update(top_k=top_k, tau=tau)

    def set_router_channels(self, channels: float, auto: bool = False):
        """A sketch router's share of input channels (its cost, hence top_k_for_share, changes with
        it); `auto`: it follows the active share from now on. Kept in the spec that is saved."""
        if not isinstance(self.router, SketchRouter):
            raise ValueError(f"only a sketch router reads a share of channels, not {self.spec['router']['kind']!r}")
        self.router.set_channels(channels)
        self.router.auto = auto
        r = self.spec["router"]
        self.spec["router"] = {**r, "options": {**r.get("options", {}), "channels": channels, "auto": auto}}

    def set_router_reuse(self, reuse: bool):
        """Whether the selected neurons complete a sketch router's partial sums (SketchRouter);
        their FLOPs, hence top_k_for_share, change with it. Kept in the spec that is saved."""
        if not isinstance(self.router, SketchRouter):
            raise ValueError(f"only a sketch router has partial sums to reuse, not {self.spec['router']['kind']!r}")
        self.router.reuse = bool(reuse)
        self._sketch_reuse = self.router.reuse and not self.router.sparsity
        r = self.spec["router"]
        self.spec["router"] = {**r, "options": {**r.get("options", {}), "reuse": bool(reuse)}}

    def set_router_approx(self, approx: float):
        """A sketch router's approx share: that share of the routed budget goes to sketched experts
        (see approx_k); top_k_for_share changes with it. Kept in the spec that is saved."""
        if not isinstance(self.router, SketchRouter):
            raise ValueError(f"only a sketch router has sketched activations to use, not {self.spec['router']['kind']!r}")
        if approx and self.router_input != "own":
            raise ValueError("sketched experts need the router to read this layer's own input, not the previous layer's")
        self.router.set_approx(approx)
        r = self.spec["router"]
        self.spec["router"] = {**r, "options": {**r.get("options", {}), "approx": float(approx)}}

    def set_router_input(self, source: str):
        """"own" (the router reads this layer's input) or "previous" (Pre-gated MoE: the previous
        layer's input; call link_pregated on the model's layers after); kept in the saved spec."""
        if source not in ("own", "previous"):
            raise ValueError(f"router input must be own or previous, got {source!r}")
        if source != "own" and self.approx_share:
            raise ValueError("a sketch router with sketched experts (approx) reads this layer's own input; "
                             "set its approx share to 0 first")
        self.router_input = self.spec["router_input"] = source
        self._fused_router = self._mlp_router and source == "own"

    @property
    def thresholded(self) -> bool:
        """Whether this layer selects by score thresholds (SketchRouter.threshold) in forward."""
        r = self.router
        return (isinstance(r, SketchRouter) and r.threshold and self.top_k is not None and self.tau is None
                and not self.oracle and self.router_input == "own")

    def thresholds(self) -> tuple[float, float]:
        """(exact, sketched) score thresholds with this layer's mean counts top_k and approx_k."""
        r = self.router
        key = (r.kept, self.top_k, self.approx_k, r.quantiles._version, r.quantiles.data_ptr())
        hit = self.__dict__.get("_thresholds")
        if hit is None or hit[0] != key:
            hit = (key, r.thresholds(self.top_k, self.top_k + self.approx_k))
            self.__dict__["_thresholds"] = hit
        return hit[1]

    def _threshold_masks(self, scores: torch.Tensor):
        """(exact [T, E], sketched [T, E] or None) by the thresholds."""
        t1, t2 = self.thresholds()
        exact = scores >= t1
        return exact, ((scores >= t2) & ~exact if t2 < t1 else None)

    @torch.no_grad()
    def fit_score_quantiles(self, inputs: torch.Tensor, tokens: int = 1024):
        """Fit a sketch router's score quantiles (SketchRouter.fit_quantiles) on this layer's
        inputs [N, D]; the grid of channel counts is kept in the spec that is saved."""
        if not isinstance(self.router, SketchRouter):
            raise ValueError(f"only a sketch router selects by score thresholds, not {self.spec['router']['kind']!r}")
        self.router.fit_quantiles(inputs, tokens)
        o = self.spec["router"]
        self.spec["router"] = {**o, "options": {**o.get("options", {}), "grid": self.router.grid}}

    @torch.no_grad()
    def fit_sketch_sparsity(self, inputs: torch.Tensor, tokens: int = 1024, norms: bool = True):
        """A pruned sketch's calibration on this layer's inputs [N, D] (SketchRouter.fit_sparsity)."""
        if not getattr(self.router, "sparsity", 0):
            raise ValueError("only a pruned sketch router (sparsity > 0) has channel norms and a density to fit")
        self.router.fit_sparsity(inputs, tokens, norms)

    def set_router_threshold(self, on: bool):
        """Select by score thresholds (needs fitted quantiles) or by a fixed top-k; kept in the spec."""
        r = self.router
        if not isinstance(r, SketchRouter):
            raise ValueError(f"only a sketch router selects by score thresholds, not {self.spec['router']['kind']!r}")
        if on and not r.grid:
            raise ValueError("this sketch router has no score quantiles; convert with --router-threshold")
        r.threshold = bool(on)
        o = self.spec["router"]
        self.spec["router"] = {**o, "options": {**o.get("options", {}), "threshold": bool(on)}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        if self._feeds is not None:  # Pre-gated MoE: the next layer's router reads this input
            self._feeds._router_x = x
        y = self._dense(x) if self.all_experts or self._dense_prompt(x) else self._sparse(x)
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(shape)

    def _dense_prompt(self, x: torch.Tensor) -> bool:
        """Whether this call takes the dense FFN: a prompt of at least spec["dense_prompt_from"]
        tokens, where one dense GEMM is faster than the sparse paths (the crossover is measured:
        compiled.DENSE_PROMPT_FROM). It computes every neuron exactly, so it changes prompt speed,
        not what a decode step computes; scoring turns it off (sparse_only), and so does training
        (gradients flow through the selected experts only)."""
        start = self.spec.get("dense_prompt_from")
        return (start is not None and x.shape[0] >= start and not self.sparse_only and not self.oracle
                and not self._learning())

    def _learning(self) -> bool:
        """Whether this call trains the experts' weights (recovery tuning: all of them, or the down
        rows alone), so it must take the masked path that carries their gradients."""
        return torch.is_grad_enabled() and (self.w_in.requires_grad or self.w_out.requires_grad)

    def set_dense_prompt_from(self, tokens: int | None):
        """Calls of at least `tokens` tokens take the dense FFN (None: never); kept in the saved spec."""
        if tokens is not None and tokens < 2:
            raise ValueError(f"the dense prompt path starts at 2 tokens or more, got {tokens}")
        self.spec["dense_prompt_from"] = tokens

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The experts each token uses (computed exactly), as a boolean mask [T, E]."""
        if self.thresholded:
            return self._threshold_masks(self._scores(x))[0]
        return select_experts(self._scores(x), self.top_k, self.tau)

    @torch.no_grad()
    def routing_step(self, x: torch.Tensor):
        """Only the routing work of forward (router and selection, on the path forward takes for
        x [T, D]): what `moefy bench` times as the router's cost."""
        kern = _kernels()
        args = self._kernel_args(kern) if kern is not None else None
        if args is None or self.tau is not None or self.oracle or self.thresholded:
            return self.route(x)
        if self._fused_router and x.shape[0] <= KERNEL_FUSED_MAX_TOKENS:
            return kern.mlp_topk(args, x.contiguous(), self.top_k)
        return kern.topk(self._rank_scores(x), self.top_k)

    def _scores(self, x):
        return self.expert_norms(x) if self.oracle else self.router(self._router_in(x))

    def _rank_scores(self, x):
        """Scores with the same top-k as _scores: an MLP router's raw logits (its output
        transforms are monotone, so they are skipped)."""
        return self.router.logits(self._router_in(x)) if self._mlp_router and not self.oracle else self._scores(x)

    def _router_in(self, x):
        """What the router reads for x [T, D]: x itself, or for a pre-gated layer the previous
        layer's input for the same tokens."""
        if self.router_input == "own":
            return x
        if self._router_x is None or self._router_x.shape[0] != x.shape[0]:
            raise RuntimeError("a pre-gated MoE layer runs only right after its previous layer (link_pregated)")
        return self._router_x

    def _cached(self, name: str, make):
        """A tensor derived from the weights (and a pruned sketch's channel norms), remade when any
        of them changed (in place too)."""
        inputs = [*self._parameters.values(), getattr(self.router, "channel_norms", None)]
        key = tuple((p.data_ptr(), p._version) for p in inputs if p is not None)
        hit = self.__dict__.setdefault("_derived", {}).get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, make())
            self._derived[name] = hit
        return hit[1]

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token, [E, T, D]: the plain reference for expert_norms."""
        E, n, D = self.w_in.shape
        h = torch.einsum("td,end->etn", x, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in[:, None, :]
        h = ACTIVATIONS[self.act](h)
        if self.w_up is not None:
            h = h * torch.einsum("td,end->etn", x, self.w_up)
        return torch.bmm(h, self.w_out)  # [E, T, D]

    def expert_norms(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """||E_e(x)||_2 for every token and expert, [T, E]. Uses each expert's Gram matrix
        G_e = W_out,e W_out,e^T: ||E_e(x)||^2 = h_e^T G_e h_e, so no [E, T, D] output is formed."""
        E, n, D = self.w_in.shape
        gram = self.w_out @ self.w_out.transpose(1, 2)  # [E, n, n]
        norms = []
        for c in x.split(chunk):
            h = self.hidden_all(c).view(-1, E, n).transpose(0, 1)  # [E, T, n]
            sq = (torch.bmm(h, gram) * h).sum(-1)  # [E, T]
            norms.append(sq.clamp_min(0).sqrt().T)
        return torch.cat(norms)

    def forward_reference(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Plain per-token loop over the selected experts: the ground truth for the fast paths."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        mask = self.route(x) if mask is None else mask
        rows = []
        for t in range(x.shape[0]):
            y = x.new_zeros(shape[-1]) if self.shared_in is None else self._shared(x[t:t + 1])[0]
            for e in mask[t].nonzero().flatten().tolist():
                b = None if self.b_in is None else self.b_in[e]
                up = None if self.w_up is None else self.w_up[e]
                y = y + self._hidden(x[t:t + 1], self.w_in[e], up, b)[0] @ self.w_out[e]
            if self.b_out is not None:
                y = y + self.b_out
            rows.append(y)
        return torch.stack(rows).reshape(shape)

    def extra_repr(self) -> str:
        E, n, D = self.w_in.shape
        sel = f"tau={self.tau}" if self.tau is not None else f"top_k={self.top_k}"
        sel += f", approx_k={self.approx_k}" if self.approx_k else ""
        return (f"experts={E}x{n}, shared={self.spec['shared']}, hidden={D}, act={self.act}, "
                f"router={self.spec['router']['kind']}, {sel}")


def link_pregated(layers: list) -> None:
    """Connect consecutive MoE layers so that each pre-gated layer (router_input "previous")
    receives its previous layer's FFN input, the input its router was trained on."""
    for prev, layer in zip(layers, layers[1:]):
        if isinstance(prev, MoEFFN):
            prev.__dict__["_feeds"] = layer if getattr(layer, "router_input", "own") == "previous" else None
