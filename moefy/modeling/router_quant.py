"""The quantised router: it estimates every routed neuron's activation from a 4-bit copy of the
gate and up rows (groups of 32 input channels, one scale each) and ranks the experts by the output
norm those estimates give, as the sketch router does with its kept channels. The copy is 1/6.4 of
the fp32 gate and up bytes (4.5 bits a weight with its scales), so ranking every neuron costs about
a tenth of a dense SwiGLU FFN's bytes, against the sketch's 40%; a masked study on SmolLM2 ranked
neurons about as well from it as from the exact activations (BENCHMARKS.md). The estimates also
feed the sketched experts (approx share) through their down rows.

Its cost is counted in fp32 weight-equivalents: the bytes it reads / 4, times 2 (what a fp32
matrix-vector product reading those bytes would cost), so an `active` budget is a share of the
FFN's weight bytes. The copy is saved with the model (buffers q_in, s_in, q_up, s_up).

# T tokens, D hidden, E routed experts, n neurons per expert, I = E * n, G = D / 32 groups
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .compiled import KERNEL_FUSED_MAX_TOKENS, _kernels
from .router_sketch import SketchRouter

GROUP = 32  # input channels per scale


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows w [I, D] as 4-bit codes [I, D / 2] (uint8, two a byte: byte k of a group holds codes k
    and 16 + k, each + 8) and scales [I, D / GROUP] (symmetric: q = round(w / s), s = max|w| / 7)."""
    I, D = w.shape
    g = w.detach().float().reshape(I, D // GROUP, GROUP)
    scale = g.abs().amax(-1) / 7.0  # [I, G]
    q = torch.where(scale[..., None] > 0, g / scale.clamp_min(1e-30)[..., None], torch.zeros_like(g))
    q = (q.round().clamp(-8, 7) + 8).to(torch.uint8)  # [I, G, 32]
    packed = q[..., :16] | (q[..., 16:] << 4)  # [I, G, 16]
    return packed.reshape(I, D // 2).contiguous(), scale.contiguous()


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The rows [I, D] a quantize() copy stands for."""
    I, G = scale.shape
    b = packed.reshape(I, G, 16)
    q = torch.cat([b & 0x0F, b >> 4], -1).float() - 8.0  # [I, G, 32]
    return (q * scale[..., None]).reshape(I, G * GROUP)


class QuantRouter(SketchRouter):
    """A sketch router whose sketch is every channel of a 4-bit copy of the gate and up rows
    (see the module docstring): selection (top-k or score thresholds), sketched experts and the
    score are the sketch router's."""

    def __init__(self, hidden: int, num_experts: int, gated: bool = True, expert_size: int = 1,
                 approx: float = 0.0, threshold: bool = False, grid: list | None = None, bits: int = 4, **_):
        if bits != 4:
            raise ValueError(f"the quantised router stores 4-bit copies, got bits={bits}")
        if hidden % GROUP:
            raise ValueError(f"the quantised router needs a hidden size divisible by {GROUP}, got {hidden}")
        super().__init__(hidden, num_experts, gated=gated, expert_size=expert_size, channels=1.0, approx=approx,
                         threshold=threshold, grid=grid)
        rows, G = num_experts * expert_size, hidden // GROUP
        self.register_buffer("q_in", torch.zeros(rows, hidden // 2, dtype=torch.uint8))
        self.register_buffer("s_in", torch.zeros(rows, G))
        self.register_buffer("q_up", torch.zeros(rows, hidden // 2, dtype=torch.uint8) if gated else None)
        self.register_buffer("s_up", torch.zeros(rows, G) if gated else None)

    def set_channels(self, channels: float):
        if channels != 1.0:
            raise ValueError("the quantised router reads every channel of its 4-bit copy")
        super().set_channels(channels)

    @torch.no_grad()
    def quantize_weights(self):
        """The 4-bit copy of the layer's gate and up rows (again after they changed: tuning)."""
        E, n, D = self.layer.w_in.shape
        self.q_in, self.s_in = quantize(self.layer.w_in.reshape(E * n, D))
        if self.layer.w_up is not None:
            self.q_up, self.s_up = quantize(self.layer.w_up.reshape(E * n, D))

    def norms(self, x: torch.Tensor, kept: int | None = None, partials: bool = False, hidden: bool = False):
        """Scores [T, E] (and with `hidden` the estimates [T, E, n]) for x [T, D]; `kept` is ignored
        (every channel is read)."""
        E, n, _ = self.shape
        h = self.estimate(x).view(-1, E, n)
        scores = self.scores_from_hidden(h)
        if partials:  # no channel was read ahead: the selected neurons are computed from all of x
            T = x.shape[0]
            zeros = x.new_zeros(T, E * n)
            sums = (torch.empty(T, 0, dtype=torch.long), zeros, zeros if self.shape[2] == 2 else None)
            return (scores, h, sums) if hidden else (scores, sums)
        return (scores, h) if hidden else scores

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """Every routed neuron's estimated activation [T, I]: the compiled kernel for few fp32 CPU
        tokens, else a GEMM on the dequantised copy (made per call, not kept)."""
        L = self.layer
        b_in = None if L.b_in is None else L.b_in.reshape(-1)
        kern = _kernels()
        if (kern is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
                and x.shape[0] <= KERNEL_FUSED_MAX_TOKENS):
            return kern.q4_hidden(x.contiguous(), self.q_in, self.s_in, self.q_up, self.s_up,
                                  None if b_in is None else b_in.detach().contiguous(), L.act)
        g, u = (None if w is None else F.linear(x, w.to(x.dtype)) for w in self.rows())
        h = ACTIVATIONS[L.act](g if b_in is None else g + b_in)
        return h if u is None else h * u

    def rows(self):
        """The gate and up rows the copy stands for, [I, D] each (no gradient: a fixed estimate)."""
        return [dequantize(self.q_in, self.s_in),
                None if self.q_up is None else dequantize(self.q_up, self.s_up)]

    def hidden_from(self, x: torch.Tensor, idx: torch.Tensor):
        """(estimates [T, I], None, None): every channel, whatever idx keeps."""
        return self.estimate(x), None, None

    def weights_view(self):
        """(None, None, the down rows' norms [E] for one-neuron experts): no transposed copy."""
        L = self.layer
        return L._cached("quant_norms", lambda: (None, None, L.w_out[:, 0].norm(dim=-1) if self.shape[1] == 1 else None))

    @torch.no_grad()
    def fit_quantiles(self, inputs: torch.Tensor, tokens: int = 1024):
        """Score quantiles at the one channel count it reads (all of them)."""
        from .router_sketch import SCORE_QUANTILES, spaced

        x = spaced(inputs, tokens).to(self.layer.w_in.dtype)
        levels = torch.linspace(0, 1, SCORE_QUANTILES + 1, dtype=torch.float64)
        scores = torch.cat([self.norms(c) for c in x.split(256)]).flatten().double()
        row = (torch.quantile(scores, levels) if scores.numel() <= 1 << 24 else
               scores.sort().values[(levels * (scores.numel() - 1)).round().long()])
        self.set_quantiles([self.kept], row[None])

    def bytes_per_token(self) -> float:
        """The copy's bytes (codes and scales) plus the down-row norms, read once per token."""
        E, n, mats = self.shape
        D = self.hidden
        return mats * E * n * (D / 2 + 4 * D / GROUP) + 4 * E

    def flops_per_token(self) -> float:
        """In fp32 weight-equivalents (module docstring): 2 x bytes / 4, plus the scoring."""
        E, n, _ = self.shape
        return 2 * self.bytes_per_token() / 4 + 2 * E * n * n

    def reused_flops_per_neuron(self) -> float:
        return 0.0
