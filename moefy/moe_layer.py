"""The MoE FFN module: a router plus expert-major expert weights, a drop-in for a dense FFN.

This file imports torch only: it is copied into every saved moefy folder so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without moefy.

# T tokens, D hidden, I ffn width, E routed experts, n neurons per expert, S shared neurons,
# K selected experts per token, H router hidden width
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# Names used by Hugging Face configs for the same functions.
ACTIVATION_ALIASES = {
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def activation_name(name: str) -> str:
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported FFN activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return name


# ----------------------------------------------------------------------------------------------
# Routers: each maps x [T, D] to non-negative scores [T, E]; larger means "more needed".


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


def sketch_channels_for(active: float | None, reuse: bool = False, sparsity: float = 0.0) -> float:
    """The sketch router's default channel share for an active FFN share: 0.8 x the share with
    reuse of its partial sums (0.4 at 50%, 0.2 at 25%), 0.6 x without (0.3, 0.15): the best
    measured on SmolLM2 (BENCHMARKS.md). Without a share (dynamic-k): 0.4 / 0.3. A pruned sketch
    (`sparsity` s) reads 0.8 x the share / (1 - s) channels, so that its nonzero products cost what
    0.8 x the share of unpruned channels cost (0.5 at 25% with s 0.6, 0.6 at 50% with s 0.33)."""
    scale = 0.8 if reuse or sparsity else 0.6
    if active is None:
        active = 0.5
    return min(1.0, max(0.05, round(scale * active / (1 - sparsity), 4)))


SKETCH_APPROX_DEFAULT = 0.3
"""A new sketch conversion's approx share (sketched experts) with a fixed top-k: the best of those
measured on SmolLM2 at 50% active FFN, and a gain at 25% too (BENCHMARKS.md)."""

SCORE_QUANTILES = 1024
"""Score quantile levels a thresholded sketch router keeps per channel count (0, 1/1024, ..., 1)."""
SCORE_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Channel shares at which a thresholded sketch router's score quantiles are fitted (and the
router's own share); others interpolate between the two nearest."""


class SketchRouter(nn.Module):
    """Training-free and without weights of its own: it reads its layer's expert weights. Each
    token keeps its `channels` share of input channels with the largest |x| (TEAL's input
    sparsity, Liu et al. 2024) and computes every routed neuron's activation from those channels
    alone; an expert's score is the output norm these sketched activations give (as
    MoEFFN.expert_norms does for the exact ones). The selected experts are then computed exactly.
    Its cost is the sketch: `channels` x the gate and up products of the routed neurons.

    `reuse`: the selected neurons start from the sketch's sums and add only the channels it did
    not read, so their gate and up products cost (1 - channels) of a full one (the compiled path
    does exactly that; the torch paths compute the same values from all channels).

    `approx`: this share of the routed experts' FLOP budget goes to sketched experts: the experts
    ranked next after the exact ones contribute their sketched activations through their down
    rows (a down projection alone per neuron, no gate or up). See MoEFFN.approx_k.

    `sparsity` s: the sketch reads pruned copies of the gate and up weights. Each neuron keeps
    the (1 - s) share of its weights with the largest |w_ij| x ||x_j|| (Wanda's score, Sun et al.
    2023; the channel norms ||x_j|| come from calibration text, fit_sketch_sparsity), so the
    sketch can read more channels for the same products: at equal FLOPs it finds the large
    contributions far better (BENCHMARKS.md). Its cost is the nonzero products on the kept
    channels, as measured on calibration text (`density`). With `reuse` a selected neuron starts
    from the pruned sketch's sums too and adds the products the sketch left out: the channels it
    did not read and, on those it read, the weights its pruning dropped. So it costs its full
    gate and up products less the sketch's nonzero ones. That saving is counted, not executed:
    every path computes the selected neurons from the full weights (the same values), as the
    compiled kernels multiply the pruned sketch's zeros (BENCHMARKS.md, "Reuse of a pruned
    sketch's sums").

    `threshold`: instead of the same top-k for every token, an expert is exact when its score
    reaches a per-layer threshold (and sketched when it reaches a second, lower one). The
    thresholds are the score quantiles, fitted on calibration text, that give the top-k's mean
    counts (MoEFFN.fit_score_quantiles), so the mean cost stays the budget's while a token with
    many large contributions gets more experts and one with few gets fewer. `grid` holds the
    channel counts the quantiles [len(grid), SCORE_QUANTILES + 1] were fitted at."""

    def __init__(self, hidden: int, num_experts: int, gated: bool = True, expert_size: int = 1,
                 channels: float = 0.3, auto: bool = False, reuse: bool = False, approx: float = 0.0,
                 threshold: bool = False, grid: list | None = None, sparsity: float = 0.0, **_):
        super().__init__()
        self.hidden = hidden
        self.shape = (num_experts, expert_size, 2 if gated else 1)
        self.auto = auto  # the share follows the active FFN share (sketch_channels_for), see MoEModel.set_active
        if not 0 <= sparsity < 1:
            raise ValueError(f"sketch router sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        if self.sparsity:  # fitted on calibration text (MoEFFN.fit_sketch_sparsity)
            self.register_buffer("channel_norms", torch.ones(hidden))
            self.register_buffer("density", torch.full((len(self.density_grid()),), 1.0 - self.sparsity))
        self.reuse = reuse
        self.set_channels(channels)
        self.set_approx(approx)
        self.grid = [int(c) for c in grid or []]
        if self.grid:
            self.register_buffer("quantiles", torch.zeros(len(self.grid), SCORE_QUANTILES + 1))
        self.threshold = bool(threshold)
        self.__dict__["layer"] = None  # the MoEFFN whose weights it reads (set by it; not a submodule)

    def set_channels(self, channels: float):
        if not 0 < channels <= 1:
            raise ValueError(f"sketch router channels must be in (0, 1], got {channels}")
        self.channels = channels
        self.kept = max(1, min(self.hidden, round(channels * self.hidden)))  # input channels per token

    def set_approx(self, approx: float):
        if not 0 <= approx < 1:
            raise ValueError(f"sketch router approx share must be in [0, 1), got {approx}")
        self.approx = float(approx)

    def forward(self, x):
        return self.layer.sketch_norms(x, self.kept)  # [T, E]

    def set_quantiles(self, grid: list, quantiles: torch.Tensor):
        """Score quantiles [len(grid), SCORE_QUANTILES + 1] at the channel counts `grid` (ascending)."""
        self.grid = [int(c) for c in grid]
        self.register_buffer("quantiles", quantiles.float().contiguous())  # replaces any earlier one

    def thresholds(self, exact: float, total: float) -> tuple[float, float]:
        """The scores above which `exact` experts and `exact + sketched` experts (`total`) are found
        per token on average, at this router's channel count: from the quantile tables, linear in
        the quantile level and, between two channel counts of the grid, in log score."""
        if not self.grid:
            raise ValueError("this sketch router has no score quantiles (fit them: MoEFFN.fit_score_quantiles)")
        E = self.shape[0]
        grid = self.grid
        hi = min(bisect.bisect_left(grid, self.kept), len(grid) - 1)  # the grid counts around kept
        lo = hi if grid[hi] <= self.kept else max(hi - 1, 0)

        def at(row: int, count: float) -> float:
            level = min(max(1.0 - count / E, 0.0), 1.0) * SCORE_QUANTILES
            i = min(int(level), SCORE_QUANTILES - 1)
            q = self.quantiles[row]
            return float(q[i] + (level - i) * (q[i + 1] - q[i]))

        def interp(count: float) -> float:
            if count >= E:
                return float("-inf")
            if count <= 0:
                return float("inf")
            a, b = at(lo, count), at(hi, count)
            if lo == hi or a <= 0 or b <= 0:
                return a
            w = (self.kept - grid[lo]) / (grid[hi] - grid[lo])
            return math.exp((1 - w) * math.log(a) + w * math.log(b))

        t1 = interp(exact)
        return t1, (interp(total) if total > exact else t1)

    def density_grid(self) -> list[int]:
        """The channel counts at which a pruned sketch's density is measured (SCORE_GRID's)."""
        return sorted({max(1, min(self.hidden, round(c * self.hidden))) for c in SCORE_GRID})

    def density_at(self, kept: int) -> float:
        """Nonzero share of the sketch's products on `kept` channels: 1 unpruned; pruned, the mean
        measured on calibration text (linear between the grid's counts)."""
        if not self.sparsity:
            return 1.0
        grid, d = self.density_grid(), self.density.tolist()
        i = min(max(bisect.bisect_left(grid, kept), 1), len(grid) - 1)
        w = min(max((kept - grid[i - 1]) / (grid[i] - grid[i - 1]), 0.0), 1.0)
        return d[i - 1] + w * (d[i] - d[i - 1])

    def flops_per_token(self) -> float:
        E, n, matrices = self.shape
        sketch = 2 * self.kept * E * n * matrices * self.density_at(self.kept)
        return sketch + 2 * E * n * n  # the sketch, then h^T G h per expert

    def reused_flops_per_neuron(self) -> float:
        """What a selected neuron saves by starting from the sketch's sums (0 without reuse): the
        sketch's products of that neuron, the nonzero ones of a pruned sketch."""
        return 2 * self.kept * self.shape[2] * self.density_at(self.kept) if self.reuse else 0


ROUTERS = {"similarity": SimilarityRouter, "representative": RepresentativeRouter, "mlp": MLPRouter,
           "sketch": SketchRouter}


def link_pregated(layers: list) -> None:
    """Connect consecutive MoE layers so that each pre-gated layer (router_input "previous")
    receives its previous layer's FFN input, the input its router was trained on."""
    for prev, layer in zip(layers, layers[1:]):
        if isinstance(prev, MoEFFN):
            prev.__dict__["_feeds"] = layer if getattr(layer, "router_input", "own") == "previous" else None


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


# ----------------------------------------------------------------------------------------------
# The compiled CPU kernels (moefy.kernels) when moefy is installed; without them (a saved folder
# loaded by plain transformers) the torch paths below give the same results up to rounding.

# Tokens per call up to which the kernels also run the router and the shared neurons; above it
# torch's GEMM is faster for those dense products. The routed experts always go to the kernels:
# they beat the torch paths at every size measured (benchmarks/kernel_paths.py, BENCHMARKS.md).
KERNEL_FUSED_MAX_TOKENS = 16
# Tokens per call from which a sketch router's layer, on the torch paths (no kernels: no compiler,
# MOEFY_KERNELS=0, a GPU, weights other than fp32, a folder loaded by plain transformers, inputs
# that carry gradients), runs as GEMMs (MoEFFN._masked) instead of a loop over its experts: 2.1x
# the dense time at 64 tokens against 12x for one-neuron experts (benchmarks/kernel_paths.py,
# BENCHMARKS.md). The kernels never take it: they compute the selected neurons alone, at about
# the same speed.
SKETCH_GEMM_MIN_TOKENS = 32
_KERNELS: object = False


def _kernels():
    global _KERNELS
    if _KERNELS is False:
        try:
            from moefy.kernels import load
        except ImportError:
            _KERNELS = None
        else:
            _KERNELS = load()
    return _KERNELS


def kept_channels(x: torch.Tensor, kept: int) -> torch.Tensor:
    """The `kept` input channels of largest |x| of each token [T, kept] (unordered): a sketch
    router's channels. The kernels' selection, when they can take x, is twice torch.topk's speed."""
    kern = _kernels()
    if kern is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad:
        return kern.topk(x.abs(), kept)
    return x.abs().topk(kept, dim=-1).indices


def spaced(rows: torch.Tensor, count: int) -> torch.Tensor:
    """An evenly spaced `count` of the rows [N, ...] (all of them when fewer): the calibration
    tokens a layer's score quantiles and pruned-sketch density are fitted on."""
    return rows[torch.linspace(0, len(rows) - 1, min(count, len(rows))).long()]


def _flat(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids of every token, flat [P], token offsets [T + 1]) of a selection mask [T, E]."""
    return mask.nonzero()[:, 1].contiguous(), F.pad(mask.sum(1).cumsum(0), (1, 0))


class MoEFFN(nn.Module):
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

    # -- bookkeeping ----------------------------------------------------------------------------

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
        """Fit a sketch router's score quantiles (SketchRouter.threshold) on this layer's inputs
        [N, D]: an evenly spaced `tokens` of them, scored at every channel count of SCORE_GRID
        and at the router's own."""
        r = self.router
        if not isinstance(r, SketchRouter):
            raise ValueError(f"only a sketch router selects by score thresholds, not {self.spec['router']['kind']!r}")
        D = self.w_in.shape[2]
        x = spaced(inputs, tokens).to(self.w_in.dtype)
        grid = sorted({max(1, min(D, round(c * D))) for c in SCORE_GRID} | {r.kept})
        levels = torch.linspace(0, 1, SCORE_QUANTILES + 1, dtype=torch.float64)
        rows = []
        for c in grid:
            scores = self.sketch_norms(x, c).flatten().double()
            rows.append(torch.quantile(scores, levels) if scores.numel() <= 1 << 24 else
                        scores.sort().values[(levels * (scores.numel() - 1)).round().long()])
        r.set_quantiles(grid, torch.stack(rows))
        o = self.spec["router"]
        self.spec["router"] = {**o, "options": {**o.get("options", {}), "grid": r.grid}}

    @torch.no_grad()
    def fit_sketch_sparsity(self, inputs: torch.Tensor, tokens: int = 1024, norms: bool = True):
        """A pruned sketch's calibration (SketchRouter.sparsity) on this layer's inputs [N, D]: the
        channel norms ||x_j|| its pruning scores use (`norms`; off to keep them, as after tuning),
        then its density, the nonzero share of its products on a token's kept channels, measured
        on an evenly spaced `tokens` of the inputs at every channel count of its grid."""
        r = self.router
        if not getattr(r, "sparsity", 0):
            raise ValueError("only a pruned sketch router (sparsity > 0) has channel norms and a density to fit")
        if norms:
            r.channel_norms.copy_(inputs.float().norm(dim=0))
        x = spaced(inputs, tokens).float()
        masks = [m for m in self._cached("sketch_masks", self._sketch_masks) if m is not None]
        kept_per_channel = sum(m.sum(0).float() for m in masks)  # [D]: nonzeros a channel brings
        rows = sum(m.shape[0] for m in masks)  # what a channel brings unpruned
        r.density.copy_(torch.tensor([float(kept_per_channel[kept_channels(x, c)].sum(-1).mean() / (c * rows))
                                      for c in r.density_grid()]))

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

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        if self._feeds is not None:  # Pre-gated MoE: the next layer's router reads this input
            self._feeds._router_x = x
        y = self._dense(x) if self.all_experts else self._sparse(x)
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(shape)

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

    def _sparse(self, x):
        T = x.shape[0]
        if torch.is_grad_enabled() and self.w_in.requires_grad:
            return self._masked(x)
        kern = _kernels()
        if kern is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not (
                torch.is_grad_enabled() and x.requires_grad):
            args = self._kernel_args(kern)
            if args is not None:
                if (self._approx_on() or self.thresholded) and not self._sketch_reuse and not self._fused_pruned(T):
                    return self._sparse_approx(x.contiguous(), kern, args)
                return self._sparse_kernel(kern, args, x.contiguous())
        if T >= SKETCH_GEMM_MIN_TOKENS and isinstance(self.router, SketchRouter) and not self.oracle \
                and self.router_input == "own":
            return self._masked(x)
        if self._approx_on() or self.thresholded:
            return self._sparse_approx(x)
        scores = self._scores(x)  # [T, E]
        if T == 1 and self.tau is None:
            # Decode: indices straight from top-k (no mask, no host sync), one gathered product.
            k = self.top_k
            y = self._experts_gather(x, scores[0].topk(k).indices)
        else:
            mask = select_experts(scores, self.top_k, self.tau)
            k = int(mask.sum())
            y = self._experts_gather(x, mask[0].nonzero().squeeze(1)) if T == 1 else self._experts_grouped(x, mask)
        self.tokens_seen += T
        self.experts_selected += k
        return y if self.shared_in is None else y + self._shared(x)

    def _fused_sketch(self, T: int) -> bool:
        """Whether the fused sketch kernel (kern.sketch_moe) can take T tokens: few of them,
        one-neuron experts, a fixed top-k or thresholds."""
        return self.tau is None and T <= KERNEL_FUSED_MAX_TOKENS and self.spec["expert_size"] == 1

    def _fused_pruned(self, T: int) -> bool:
        """Whether the fused kernel takes this call for a pruned sketch (SketchRouter.sparsity), on
        the layer's own input. It computes the selected neurons from every channel (a pruned sketch's
        reuse is counted, not executed: SketchRouter), as the torch paths do."""
        return (getattr(self.router, "sparsity", 0) > 0 and self._fused_sketch(T) and not self.oracle
                and self.router_input == "own")

    def _kernel_args(self, kern):
        """The kernels' view of this layer's weights, rebuilt whenever a weight tensor changed."""
        cached = self.__dict__.get("_kargs")
        if cached is None or cached.key != kern.weights_key(self):
            cached = kern.prepare(self)
            self.__dict__["_kargs"] = cached
        return cached

    def _sparse_kernel(self, kern, args, x):
        """The compiled path (moefy.kernels) for the routed experts. Few tokens: router, top-k,
        experts and shared neurons in one call. Many tokens: the router's and the shared
        neurons' dense products go to torch's GEMM, which is faster there."""
        T = x.shape[0]
        self.tokens_seen += T
        few = T <= KERNEL_FUSED_MAX_TOKENS
        if (self._sketch_reuse or self._fused_pruned(T)) and not self.oracle and self.router_input == "own":
            return self._sketch_kernel(kern, args, x)
        if self.tau is None:
            self.experts_selected += T * self.top_k
            if few and self._fused_router and not self.oracle:
                return kern.mlp_moe(args, x, self.top_k)
            y = kern.experts(args, x, kern.topk(self._rank_scores(x), self.top_k), shared=few)
        else:
            experts, offsets = _flat(select_experts(self._scores(x), self.top_k, self.tau))
            self.experts_selected += len(experts)
            y = kern.experts(args, x, experts, offsets, shared=few)
        return y if few or self.shared_in is None else y + self._shared(x)

    def _sketch_kernel(self, kern, args, x):
        """The compiled path of a sketch router with reuse: the selected neurons complete the
        sketch's partial sums over the channels it did not read; sketched experts (approx_k) join
        their down projection. A pruned sketch takes its fused branch too (_fused_pruned), with
        the selected neurons computed from every channel."""
        kb = self.approx_k if self._approx_on() else 0
        thresholds = self.thresholds() if self.thresholded else None
        if self._fused_sketch(x.shape[0]):
            t_in, t_up, norms = self._sketch_weights()
            y, exact, sketched = kern.sketch_moe(args, x, self.top_k, self.router.kept, t_in, t_up, norms,
                                                 sketched=kb, thresholds=thresholds, reuse=self._sketch_reuse)
            self.experts_selected += exact
            self.sketched_selected += sketched
            return y
        scores, h, (kept, gp, upp) = self.sketch_norms(x, self.router.kept, partials=True, hidden=True)
        if thresholds is None and self.tau is None:
            exact, sketched = self._tiers(scores, kern) if kb else (kern.topk(scores, self.top_k), None)
            self.experts_selected += x.shape[0] * self.top_k
            self.sketched_selected += x.shape[0] * kb
            y = kern.sketch_experts(args, x, kept, gp, upp, exact.contiguous(), sketched=sketched, hidden=h)
        else:  # a number of experts per token of its own: score thresholds or dynamic-k
            exact, sketched = (self._threshold_masks(scores) if thresholds is not None else
                               (select_experts(scores, self.top_k, self.tau), None))
            experts, offsets = _flat(exact)
            self.experts_selected += len(experts)
            extra = {}
            if sketched is not None:
                ids, offs = _flat(sketched)
                self.sketched_selected += len(ids)
                extra = dict(sketched=ids, sketched_offsets=offs, hidden=h)
            y = kern.sketch_experts(args, x, kept, gp, upp, experts, offsets, **extra)
        return y if self.shared_in is None else y + self._shared(x)

    def _masked(self, x):
        """Every routed neuron computed, the unselected experts zeroed: one GEMM per matrix, the
        same function as the sparse paths. It saves no FLOPs. Two callers: recovery tuning
        (moefy.tuning; the expert weights require grad), where one GEMM carries the gradients of
        all selected experts; and a sketch router's layer at many tokens on the torch paths (see
        SKETCH_GEMM_MIN_TOKENS), where it replaces a loop over thousands of one-neuron experts.
        The counts are the selection's, so the FLOP share reported is what the sparse paths cost."""
        y = self.selected_hidden(x).flatten(1) @ self.w_out.flatten(0, 1)
        return y if self.shared_in is None else y + self._shared(x)

    def selected_hidden(self, x, full=None):
        """The routed neurons' activations as this layer's output uses them, [T, E, n]: exact for
        the selected experts, the sketch's estimate for the sketched ones, 0 for the others (the
        output is this times the down rows, plus the shared neurons'). Counts the selection.
        `full`: hidden_all(x), when the caller has it already."""
        E, n, D = self.w_in.shape
        sketch = isinstance(self.router, SketchRouter) and not self.oracle and self.router_input == "own"
        sketched = None
        if sketch:  # the sketch once, with gradients: it ranks the experts and gives the sketched ones
            hs = self._sketch_hidden(x, kept_channels(x.detach(), self.router.kept))[0].view(-1, E, n)
        with torch.no_grad():
            if not sketch:
                mask = self.route(x)  # [T, E]
            elif self.thresholded:
                mask, sketched = self._threshold_masks(self._sketch_scores(hs.detach()))
            elif self._approx_on():
                exact, second = self._tiers(self._sketch_scores(hs.detach()))
                mask = torch.zeros(x.shape[0], E, dtype=torch.bool, device=x.device).scatter_(1, exact, True)
                sketched = torch.zeros_like(mask).scatter_(1, second, True)
            else:
                mask = select_experts(self._sketch_scores(hs.detach()), self.top_k, self.tau)
        self.tokens_seen += x.shape[0]
        self.experts_selected += int(mask.sum())
        h = (self.hidden_all(x) if full is None else full).view(-1, E, n) * mask.unsqueeze(-1).to(x.dtype)
        if sketched is not None:
            self.sketched_selected += int(sketched.sum())
            h = h + hs * sketched.unsqueeze(-1).to(x.dtype)
        return h

    def _hidden(self, x, w_in, w_up, b_in):
        h = ACTIVATIONS[self.act](F.linear(x, w_in, b_in))
        return h * F.linear(x, w_up) if w_up is not None else h

    def _shared(self, x):
        return self._hidden(x, self.shared_in, self.shared_up, self.shared_b_in) @ self.shared_out

    def hidden_all(self, x):
        """The hidden activations of every routed neuron, expert-major, [T, E*n] (no copies)."""
        E, n, D = self.w_in.shape
        flat = lambda w: None if w is None else w.reshape(E * n, *w.shape[2:])  # noqa: E731
        return self._hidden(x, flat(self.w_in), flat(self.w_up), flat(self.b_in))

    def _dense(self, x):
        """Every expert: the dense FFN computed from the expert-major weights, without copies."""
        y = self.hidden_all(x) @ self.w_out.flatten(0, 1)
        return y if self.shared_in is None else y + self._shared(x)

    def _experts_gather(self, x, idx):
        """One token: gather the selected experts' rows into one product (decode path)."""
        take = lambda w: None if w is None else w.index_select(0, idx).flatten(0, 1)  # noqa: E731
        h = self._hidden(x, take(self.w_in), take(self.w_up), take(self.b_in))  # [1, K*n]
        return h @ take(self.w_out)

    def _experts_grouped(self, x, mask):
        """Many tokens: sort (token, expert) pairs by expert, one product per active expert."""
        tok, exp = mask.nonzero(as_tuple=True)  # pairs, sorted by token
        order = exp.argsort(stable=True)
        tok = tok[order]
        counts = torch.bincount(exp, minlength=mask.shape[1]).tolist()
        y = x.new_zeros(x.shape)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            t = tok[start:start + count]
            start += count
            b = None if self.b_in is None else self.b_in[e]
            up = None if self.w_up is None else self.w_up[e]
            h = self._hidden(x.index_select(0, t), self.w_in[e], up, b)  # [c, n]
            y.index_add_(0, t, h @ self.w_out[e])
        return y

    # -- reference and analysis paths -----------------------------------------------------------

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

    def sketch_norms(self, x: torch.Tensor, kept: int, partials: bool = False, hidden: bool = False):
        """SketchRouter's scores [T, E]: each expert's output norm with its neurons' activations
        computed from the token's `kept` input channels of largest |x| (the others read as 0).
        `partials` (compiled path, fp32 CPU x): (scores, (kept channel ids [T, c], gate sums, up
        sums [T, E*n] or None)), the sums before bias and activation, for `kernels.sketch_experts`.
        `hidden`: the sketched activations [T, E, n] come second, (scores, h[, partials])."""
        E, n, D = self.w_in.shape
        idx = kept_channels(x, kept)  # [T, c]
        kern = _kernels()
        few = x.shape[0] <= KERNEL_FUSED_MAX_TOKENS
        if kern is not None and not (x.dtype == self.w_in.dtype == torch.float32 and x.device.type == "cpu" and few):
            kern = None  # many tokens: one GEMM on the masked inputs is faster than gathering rows per token
        sums = None
        if x.shape[0] == 1 or kern is not None:
            # Read only the kept channels' rows of the transposed weights ([D, E*n], cached).
            t_in, t_up, _ = self._sketch_weights()
            b_in = None if self.b_in is None else self.b_in.reshape(-1)
            if kern is not None:
                h = kern.sketch(x.contiguous(), idx, t_in, t_up, b_in, self.act, partials=partials)
                if partials:
                    h, *sums = h
            else:  # one token, torch only
                i, xs = idx[0], x[0, idx[0]]
                h = ACTIVATIONS[self.act](xs @ t_in.index_select(0, i) + (0 if b_in is None else b_in))
                h = (h if t_up is None else h * (xs @ t_up.index_select(0, i)))[None]
        else:
            h, *sums = self._sketch_hidden(x, idx)
        h = h.view(-1, E, n)
        scores = self._sketch_scores(h)
        if not partials:
            return (scores, h) if hidden else scores
        if sums is None:
            raise RuntimeError("sketch partial sums need the compiled kernels or more than one token")
        return (scores, h, (idx, *sums)) if hidden else (scores, (idx, *sums))

    def _sketch_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Each expert's output norm [T, E] with its neurons' sketched activations h [T, E, n]."""
        if h.shape[-1] == 1:
            return h[..., 0].abs() * self._sketch_weights()[2]
        gram = self._cached("gram", lambda: self.w_out @ self.w_out.transpose(1, 2))  # [E, n, n]
        return torch.einsum("ten,enm,tem->te", h, gram, h).clamp_min(0).sqrt()

    def _sketch_hidden(self, x: torch.Tensor, idx: torch.Tensor):
        """(sketched activations [T, E*n], gate sums, up sums or None) from the kept channels
        idx [T, c]: one GEMM on the masked inputs (differentiable in the weights and x)."""
        E, n, D = self.w_in.shape
        masked = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
        flat = lambda w: None if w is None else w.reshape(E * n, *w.shape[2:])  # noqa: E731
        g, u = (None if w is None else F.linear(masked, w) for w in self._sketch_rows())
        h = ACTIVATIONS[self.act](g if self.b_in is None else g + flat(self.b_in))  # [T, E*n]
        return (h if u is None else h * u), g, u

    def _approx_on(self) -> bool:
        """Whether this forward adds sketched experts (see approx_k)."""
        return self.approx_k > 0 and not self.oracle and self.router_input == "own"

    def _tiers(self, scores: torch.Tensor, kern=None):
        """(exact [T, k], sketched [T, approx_k]) expert ids: the top_k best scores, then the next."""
        k, kb = self.top_k, self.approx_k
        if kern is None:
            top = scores.topk(k + kb, dim=-1).indices  # sorted
            return top[:, :k], top[:, k:]
        top = kern.topk(scores, k + kb)  # unordered
        first = scores.gather(1, top).topk(k, dim=-1).indices
        pick = torch.zeros_like(top, dtype=torch.bool).scatter_(1, first, True)
        return top.gather(1, first), top[~pick].view(-1, kb)

    def _sketched(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The sketched experts' output [T, D]: activations h [T, E, n] of experts idx [T, kb]
        through their down rows (one gathered product for one token; a masked GEMM for many)."""
        if h.shape[0] == 1:
            return h[0].index_select(0, idx[0]).reshape(1, -1) @ self.w_out.index_select(0, idx[0]).flatten(0, 1)
        at = idx.unsqueeze(-1).expand(-1, -1, h.shape[2])
        z = torch.zeros_like(h).scatter(1, at, h.gather(1, at))
        return z.flatten(1) @ self.w_out.flatten(0, 1)

    def _sparse_approx(self, x: torch.Tensor, kern=None, args=None) -> torch.Tensor:
        """Inference with sketched experts or score thresholds, without completing the sketch's
        sums (an unpruned sketch with reuse goes to the kernels, _sketch_kernel): the top_k exact experts (on the
        kernels when given) plus the next approx_k sketched ones, or those the thresholds pick."""
        T = x.shape[0]
        self.tokens_seen += T
        scores, h = self.sketch_norms(x, self.router.kept, hidden=True)
        shared_done = kern is not None and T <= KERNEL_FUSED_MAX_TOKENS
        if self.thresholded:
            mask, approx = self._threshold_masks(scores)
            self.experts_selected += int(mask.sum())
            if kern is not None:
                y = kern.experts(args, x, *_flat(mask), shared=shared_done)
            elif T == 1:
                y = self._experts_gather(x, mask[0].nonzero().squeeze(1))
            else:
                y = self._experts_grouped(x, mask)
            if approx is not None:
                self.sketched_selected += int(approx.sum())
                y = y + self._sketched_masked(h, approx)
            return y if shared_done or self.shared_in is None else y + self._shared(x)
        self.experts_selected += T * self.top_k
        self.sketched_selected += T * self.approx_k
        exact, approx = self._tiers(scores, kern)
        if kern is not None:
            y = kern.experts(args, x, exact, shared=shared_done)
        elif T == 1:
            y = self._experts_gather(x, exact[0])
        else:
            y = self._experts_grouped(x, torch.zeros_like(scores, dtype=torch.bool).scatter_(1, exact, True))
        y = y + self._sketched(h, approx)
        return y if shared_done or self.shared_in is None else y + self._shared(x)

    def _sketched_masked(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The sketched experts' output [T, D] for a mask [T, E] of them (as _sketched)."""
        if h.shape[0] == 1:
            return self._sketched(h, mask[0].nonzero().T)
        return (h * mask.unsqueeze(-1).to(h.dtype)).flatten(1) @ self.w_out.flatten(0, 1)

    def _sketch_weights(self):
        """The sketch's view of the routed weights, derived and cached: gate and up transposed to
        [D, E*n] (a kept channel is one contiguous row), and for one-neuron experts the down rows'
        norms [E] (None otherwise)."""
        def make():
            E, n, D = self.w_in.shape
            t_in, t_up = (None if w is None else w.reshape(E * n, D).T.contiguous() for w in self._sketch_rows())
            return t_in, t_up, self.w_out[:, 0].norm(dim=-1) if n == 1 else None
        return self._cached("sketch", make)

    def _sketch_rows(self):
        """The gate and up rows the sketch reads, [E*n, D] each (up None when not gated): the
        weights themselves, or for a pruned sketch (SketchRouter.sparsity) their product with the
        pruning masks, in the autograd graph (tuning trains the weights through it)."""
        E, n, D = self.w_in.shape
        rows = [None if w is None else w.reshape(E * n, D) for w in (self.w_in, self.w_up)]
        if not getattr(self.router, "sparsity", 0):
            return rows
        masks = self._cached("sketch_masks", self._sketch_masks)
        return [None if w is None else w * m for w, m in zip(rows, masks)]

    def _sketch_masks(self):
        """A pruned sketch's masks for the gate and up rows: each row keeps its (1 - sparsity)
        share of weights with the largest |w_ij| x ||x_j|| (the router's calibration channel norms)."""
        E, n, D = self.w_in.shape
        r = self.router
        keep = max(1, D - round(r.sparsity * D))
        out = []
        for w in (self.w_in, self.w_up):
            if w is None:
                out.append(None)
                continue
            score = w.detach().reshape(E * n, D).abs().float() * r.channel_norms.float()
            out.append(torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True))
        return out

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

