"""The sketch router: training-free, it scores experts from a share of each token's input channels
through its layer's own expert weights (TEAL-style input sparsity), optionally pruned (Wanda scores),
with score thresholds fitted on calibration text.

# T tokens, D hidden, E routed experts, n neurons per expert, c kept channels per token
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ACTIVATIONS
from .compiled import KERNEL_FUSED_MAX_TOKENS, _kernels


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
        return self.norms(x, self.kept)  # [T, E]

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


    def norms(self, x: torch.Tensor, kept: int, partials: bool = False, hidden: bool = False):
        """SketchRouter's scores [T, E]: each expert's output norm with its neurons' activations
        computed from the token's `kept` input channels of largest |x| (the others read as 0).
        `partials` (compiled path, fp32 CPU x): (scores, (kept channel ids [T, c], gate sums, up
        sums [T, E*n] or None)), the sums before bias and activation, for `kernels.sketch_experts`.
        `hidden`: the sketched activations [T, E, n] come second, (scores, h[, partials])."""
        E, n, D = self.layer.w_in.shape
        idx = kept_channels(x, kept)  # [T, c]
        kern = _kernels()
        few = x.shape[0] <= KERNEL_FUSED_MAX_TOKENS
        if kern is not None and not (x.dtype == self.layer.w_in.dtype == torch.float32 and x.device.type == "cpu" and few):
            kern = None  # many tokens: one GEMM on the masked inputs is faster than gathering rows per token
        sums = None
        if x.shape[0] == 1 or kern is not None:
            # Read only the kept channels' rows of the transposed weights ([D, E*n], cached).
            t_in, t_up, _ = self.weights_view()
            b_in = None if self.layer.b_in is None else self.layer.b_in.reshape(-1)
            if kern is not None:
                h = kern.sketch(x.contiguous(), idx, t_in, t_up, b_in, self.layer.act, partials=partials)
                if partials:
                    h, *sums = h
            else:  # one token, torch only
                i, xs = idx[0], x[0, idx[0]]
                h = ACTIVATIONS[self.layer.act](xs @ t_in.index_select(0, i) + (0 if b_in is None else b_in))
                h = (h if t_up is None else h * (xs @ t_up.index_select(0, i)))[None]
        else:
            h, *sums = self.hidden_from(x, idx)
        h = h.view(-1, E, n)
        scores = self.scores_from_hidden(h)
        if not partials:
            return (scores, h) if hidden else scores
        if sums is None:
            raise RuntimeError("sketch partial sums need the compiled kernels or more than one token")
        return (scores, h, (idx, *sums)) if hidden else (scores, (idx, *sums))

    def scores_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Each expert's output norm [T, E] with its neurons' sketched activations h [T, E, n]."""
        if h.shape[-1] == 1:
            return h[..., 0].abs() * self.weights_view()[2]
        gram = self.layer._cached("gram", lambda: self.layer.w_out @ self.layer.w_out.transpose(1, 2))  # [E, n, n]
        return torch.einsum("ten,enm,tem->te", h, gram, h).clamp_min(0).sqrt()

    def hidden_from(self, x: torch.Tensor, idx: torch.Tensor):
        """(sketched activations [T, E*n], gate sums, up sums or None) from the kept channels
        idx [T, c]: one GEMM on the masked inputs (differentiable in the weights and x)."""
        E, n, D = self.layer.w_in.shape
        masked = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
        flat = lambda w: None if w is None else w.reshape(E * n, *w.shape[2:])  # noqa: E731
        g, u = (None if w is None else F.linear(masked, w) for w in self.rows())
        h = ACTIVATIONS[self.layer.act](g if self.layer.b_in is None else g + flat(self.layer.b_in))  # [T, E*n]
        return (h if u is None else h * u), g, u

    def weights_view(self):
        """The sketch's view of the routed weights, derived and cached: gate and up transposed to
        [D, E*n] (a kept channel is one contiguous row), and for one-neuron experts the down rows'
        norms [E] (None otherwise)."""
        def make():
            E, n, D = self.layer.w_in.shape
            t_in, t_up = (None if w is None else w.reshape(E * n, D).T.contiguous() for w in self.rows())
            return t_in, t_up, self.layer.w_out[:, 0].norm(dim=-1) if n == 1 else None
        return self.layer._cached("sketch", make)

    def rows(self):
        """The gate and up rows the sketch reads, [E*n, D] each (up None when not gated): the
        weights themselves, or for a pruned sketch (SketchRouter.sparsity) their product with the
        pruning masks, in the autograd graph (tuning trains the weights through it)."""
        E, n, D = self.layer.w_in.shape
        rows = [None if w is None else w.reshape(E * n, D) for w in (self.layer.w_in, self.layer.w_up)]
        if not self.sparsity:
            return rows
        masks = self.layer._cached("sketch_masks", self.masks)
        return [None if w is None else w * m for w, m in zip(rows, masks)]

    def masks(self):
        """A pruned sketch's masks for the gate and up rows: each row keeps its (1 - sparsity)
        share of weights with the largest |w_ij| x ||x_j|| (the router's calibration channel norms)."""
        E, n, D = self.layer.w_in.shape
        r = self
        keep = max(1, D - round(r.sparsity * D))
        out = []
        for w in (self.layer.w_in, self.layer.w_up):
            if w is None:
                out.append(None)
                continue
            score = w.detach().reshape(E * n, D).abs().float() * r.channel_norms.float()
            out.append(torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True))
        return out

    @torch.no_grad()
    def fit_quantiles(self, inputs: torch.Tensor, tokens: int = 1024):
        """Fit a sketch router's score quantiles (SketchRouter.threshold) on this layer's inputs
        [N, D]: an evenly spaced `tokens` of them, scored at every channel count of SCORE_GRID
        and at the router's own."""
        r = self
        D = self.layer.w_in.shape[2]
        x = spaced(inputs, tokens).to(self.layer.w_in.dtype)
        grid = sorted({max(1, min(D, round(c * D))) for c in SCORE_GRID} | {r.kept})
        levels = torch.linspace(0, 1, SCORE_QUANTILES + 1, dtype=torch.float64)
        rows = []
        for c in grid:
            scores = self.norms(x, c).flatten().double()
            rows.append(torch.quantile(scores, levels) if scores.numel() <= 1 << 24 else
                        scores.sort().values[(levels * (scores.numel() - 1)).round().long()])
        r.set_quantiles(grid, torch.stack(rows))

    @torch.no_grad()
    def fit_sparsity(self, inputs: torch.Tensor, tokens: int = 1024, norms: bool = True):
        """A pruned sketch's calibration (SketchRouter.sparsity) on this layer's inputs [N, D]: the
        channel norms ||x_j|| its pruning scores use (`norms`; off to keep them, as after tuning),
        then its density, the nonzero share of its products on a token's kept channels, measured
        on an evenly spaced `tokens` of the inputs at every channel count of its grid."""
        r = self
        if not getattr(r, "sparsity", 0):
            raise ValueError("only a pruned sketch router (sparsity > 0) has channel norms and a density to fit")
        if norms:
            r.channel_norms.copy_(inputs.float().norm(dim=0))
        x = spaced(inputs, tokens).float()
        masks = [m for m in self.layer._cached("sketch_masks", self.masks) if m is not None]
        kept_per_channel = sum(m.sum(0).float() for m in masks)  # [D]: nonzeros a channel brings
        rows = sum(m.shape[0] for m in masks)  # what a channel brings unpruned
        r.density.copy_(torch.tensor([float(kept_per_channel[kept_channels(x, c)].sum(-1).mean() / (c * rows))
                                      for c in r.density_grid()]))
