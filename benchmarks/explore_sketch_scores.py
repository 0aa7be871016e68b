"""A masked study (not an execution path): how the sketch router should score a neuron from its
partial sums.

The sketch reads the token's kept input channels (largest |x|) and has, for every neuron, the
partial gate and up sums g_p, u_p. The executed score is |act(g_p) u_p| x ||w_down||: it treats the
channels left out as zero. They are not: the rest of the sum is g - g_p, which for a token with
input energy r2 = ||x_left||^2 on the channels left has a variance of about r2 x ||w_g||^2 / D
(weights spread evenly over the channels). A neuron with g_p slightly below zero and a large
residual variance may well be active. The `gauss` score takes the expectation of |act(g) u| with
g ~ N(g_p, s_g^2), u ~ N(u_p, s_u^2) (Gauss-Hermite quadrature), scaled by ||w_down||; `gauss-mean`
is a closed form of the same idea (|E act(g)| x E|u|, with silu(g) ~ g Phi(1.702 g)). Every score
selects the same number of neurons, so the FLOPs are equal (with reuse; the elementwise cost of
a score is below 1% of a neuron's and is not counted).

    python benchmarks/explore_sketch_scores.py --out benchmarks/results/sketch_scores.json
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import torch

from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN

import study

SQRT2 = math.sqrt(2.0)


def _phi(z):
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _Phi(z):
    return 0.5 * (1 + torch.erf(z / SQRT2))


def folded_mean(mu, s):
    """E|u| for u ~ N(mu, s^2)."""
    z = mu / s
    return s * math.sqrt(2 / math.pi) * torch.exp(-0.5 * z * z) + mu * (1 - 2 * _Phi(-z))


def silu_mean(mu, s, lam=1.702):
    """E[g Phi(lam g)] for g ~ N(mu, s^2): a closed form of E silu(g) (silu(g) ~ g Phi(1.702 g))."""
    k = torch.sqrt(1 + lam * lam * s * s)
    a = lam * mu / k
    return mu * _Phi(a) + s * s * lam * _phi(a) / k


class Scorer:
    def __init__(self, layer: MoEFFN, kind: str, alpha: float = 1.0, points: int = 5, rank: int = 0):
        self.layer, self.kind, self.alpha, self.rank = layer, kind, alpha, rank
        if rank:
            u, sv, vt = torch.linalg.svd(layer.w_out[:, 0].T, full_matrices=False)  # [D, N] = U S V^T
            self.v, self.us = vt[:rank].T.contiguous(), (u[:, :rank] * sv[:rank]).T.contiguous()  # [N, r], [r, D]
        E, n, D = layer.w_in.shape
        self.wg, self.wu = layer.w_in[:, 0], layer.w_up[:, 0]  # [E, D]
        self.down = layer.w_out[:, 0].norm(dim=-1)  # [E]
        self.g2, self.u2 = (self.wg ** 2).sum(-1) / D, (self.wu ** 2).sum(-1) / D  # mean squared weight
        self.cov = (self.wg * self.wu).sum(-1) / D
        z, w = np.polynomial.hermite_e.hermegauss(points)  # probabilists' Hermite: weight exp(-z^2/2)
        self.z, self.w = torch.tensor(z, dtype=torch.float32), torch.tensor(w / w.sum(), dtype=torch.float32)

    def __call__(self, x: torch.Tensor, kept: int) -> torch.Tensor:
        idx = x.abs().topk(kept, dim=-1).indices
        xs = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
        gp, up = xs @ self.wg.T, xs @ self.wu.T  # [T, E]
        act = ACTIVATIONS[self.layer.act]
        if self.kind == "partial":
            return (act(gp) * up).abs() * self.down
        r2 = ((x - xs) ** 2).sum(-1, keepdim=True) * self.alpha  # [T, 1] energy of the channels left
        sg, su = (r2 * self.g2).sqrt().clamp_min(1e-6), (r2 * self.u2).sqrt().clamp_min(1e-6)
        if self.kind == "gauss-mean":
            return silu_mean(gp, sg).abs() * folded_mean(up, su) * self.down
        if self.kind == "gauss":  # E|act(g) u|, g and u correlated through the same channels
            rho = (r2 * self.cov / (sg * su)).clamp(-0.99, 0.99)
            out = torch.zeros_like(gp)
            for za, wa in zip(self.z, self.w):
                g = gp + sg * za
                ag = act(g)
                # u | g ~ N(up + rho su za, su^2 (1 - rho^2))
                out += wa * ag.abs() * folded_mean(up + rho * su * za, su * (1 - rho * rho).sqrt())
            return out * self.down
        raise ValueError(self.kind)


def masked_forward(layer: MoEFFN, scorer: Scorer, x: torch.Tensor, k: int, stats: dict,
                   compensate: float = 0.0) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    scores = scorer(x, layer.router.kept)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=-1).indices, True)
    h = layer.hidden_all(x)
    true = h.abs() * scorer.down
    best = torch.zeros_like(chosen).scatter_(1, true.topk(k, dim=-1).indices, True)
    stats["recall"] += (chosen & best).sum().item() / (k * x.shape[0])
    stats["mass"] += ((true * chosen).sum(-1) / (true * best).sum(-1)).mean().item()
    stats["n"] += 1
    y = (h * chosen) @ layer.w_out[:, 0]
    if compensate:  # the unselected neurons' sketched activations, times beta (an upper bound: not counted)
        idx = x.abs().topk(layer.router.kept, dim=-1).indices
        xs = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
        est = ACTIVATIONS[layer.act](xs @ scorer.wg.T) * (xs @ scorer.wu.T)
        z = est * ~chosen
        if scorer.rank:  # W_down ~ (U S)(V^T), rank r: the compensation costs 2 r (N + D) FLOPs per token
            y = y + compensate * ((z @ scorer.v) @ scorer.us)
        else:
            y = y + compensate * z @ layer.w_out[:, 0]
    if layer.shared_in is not None:
        y = y + layer._shared(x)
    return y.reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--scores", nargs="+", default=["partial", "gauss-mean", "gauss"])
    ap.add_argument("--alpha", type=float, nargs="+", default=[1.0], help="scale of the residual variance")
    ap.add_argument("--compensate", type=float, nargs="+", default=[0.0],
                    help="add beta x the unselected neurons' sketched outputs (full rank, cost not counted)")
    ap.add_argument("--rank", type=int, nargs="+", default=[0], help="rank of the compensation (0: full)")
    ap.add_argument("--count", action="store_true", help="charge the low-rank compensation to the budget")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--data", default="wiki-sample:heldout")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded, heldout, dense = study.smollm(args.data, args.tokens)
    m = study.sketch_model(loaded)
    rows = []
    for active in args.active:
        m.set_active(active)
        for kind in args.scores:
            for alpha, beta, rank in itertools.product(args.alpha if kind != "partial" else [1.0], args.compensate,
                                                       args.rank if any(args.compensate) else [0]):
                if rank and not beta:
                    continue
                stats = {"recall": 0.0, "mass": 0.0, "n": 0}
                for layer in m.layers:
                    scorer = Scorer(layer, kind, alpha, rank=rank)
                    E, _, D = layer.w_in.shape
                    per = layer.flops_per_token(1) - layer.flops_per_token(0)
                    k = layer.top_k - (math.ceil(2 * rank * (E + D) / per) if args.count and beta else 0)
                    layer.forward = (lambda lay, sc, kk: lambda x: masked_forward(lay, sc, x, kk, stats, beta))(
                        layer, scorer, k)
                ppl, seconds = study.timed_perplexity(m.model, heldout)
                rows.append({"active": active, "score": kind, "alpha": alpha, "compensate": beta, "rank": rank,
                             "counted": args.count, "channels": m.layers[0].router.channels, "top_k": k, "ppl": ppl, "ppl_ratio": ppl / dense,
                             "recall": stats["recall"] / stats["n"], "mass": stats["mass"] / stats["n"],
                             "seconds": seconds})
                print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows, args)


if __name__ == "__main__":
    main()
