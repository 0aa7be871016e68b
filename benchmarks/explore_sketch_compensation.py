"""A masked study (not an execution path): compensate for the neurons the sketch router leaves out.

The sketch has every routed neuron's activation estimated from the token's kept channels,
h_hat = act(g_p) u_p. The selected neurons are computed exactly. The others are dropped, yet
their estimates are there for free. Adding W_down (h_hat * unselected) back (full rank, cost not
counted) takes SmolLM2 at 50% from 1.41x to 1.18x. That costs a down projection for every
unselected neuron, which is more than the budget has. This study looks for a rank-r map M
(cost 2 r (N + D) FLOPs per token, charged to the budget by selecting fewer neurons) with
y += M z, z = h_hat * unselected:

- `svd`: M = W_down truncated to rank r;
- `pca`: M = P P^T W_down, with P the top r principal directions of W_down z on calibration text;
- `rrr`: reduced-rank regression of the true contribution of the unselected neurons,
  W_down (h * unselected), on z, fitted on calibration text (it also corrects the estimates'
  bias and scale), plus a constant;
- `full`: W_down itself (uncounted, the upper bound).

    python benchmarks/explore_sketch_compensation.py --out benchmarks/results/sketch_compensation.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN

import study


def sketch(layer: MoEFFN, x: torch.Tensor, k: int, k_b: int = 0):
    """(chosen mask [T, N], h exact [T, N], z = h_hat of the unselected neurons [T, N]; with k_b,
    only of the k_b neurons ranked next after the k chosen)."""
    wg, wu = layer.w_in[:, 0], layer.w_up[:, 0]
    act = ACTIVATIONS[layer.act]
    idx = x.abs().topk(layer.router.kept, dim=-1).indices
    xs = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
    est = act(xs @ wg.T) * (xs @ wu.T)
    scores = est.abs() * layer.w_out[:, 0].norm(dim=-1)
    top = scores.topk(k + k_b, dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top[:, :k], True)
    if k_b:
        second = torch.zeros_like(chosen).scatter_(1, top[:, k:], True)
        return chosen, layer.hidden_all(x), est * second
    return chosen, layer.hidden_all(x), est * ~chosen


class Comp:
    """Per-layer state: statistics while fitting, then the map (a [N, r] and b [r, D], c [D])."""

    def __init__(self, layer: MoEFFN, kind: str, rank: int, k: int, k_b: int = 0, beta: float = 1.0):
        self.layer, self.kind, self.rank, self.k, self.k_b, self.beta = layer, kind, rank, k, k_b, beta
        self.fitting = kind in ("pca", "rrr", "bias")
        N, D = layer.w_out.shape[0], layer.w_out.shape[-1]
        self.zz, self.zt, self.tt = torch.zeros(N + 1, N + 1, dtype=torch.float64), torch.zeros(N + 1, D, dtype=torch.float64), 0
        self.cc = torch.zeros(D, D, dtype=torch.float64)
        self.a = self.b = None
        wd = layer.w_out[:, 0]
        if kind == "svd":
            u, s, vt = torch.linalg.svd(wd.T, full_matrices=False)
            self.a, self.b = vt[:rank].T.contiguous(), (u[:, :rank] * s[:rank]).T.contiguous()

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        wd = self.layer.w_out[:, 0]
        chosen, h, z = sketch(self.layer, x, self.k, self.k_b)
        y = (h * chosen) @ wd
        if self.fitting:
            z1 = torch.cat([z, torch.ones_like(z[:, :1])], 1).double()
            if self.kind in ("rrr", "bias"):
                self.zz += z1.T @ z1
                self.zt += z1.T @ ((h * ~chosen) @ wd).double()
            else:
                c = (z @ wd).double()
                self.cc += c.T @ c
        elif self.kind in ("full", "tier"):
            y = y + self.beta * z @ wd
        elif self.a is not None:
            y = y + (z @ self.a) @ self.b + (0 if self.c is None else self.c)
        elif self.c is not None:
            y = y + self.c
        return y.reshape(shape)

    c = None

    def finish(self, ridge: float):
        wd = self.layer.w_out[:, 0].double()
        r = self.rank
        if self.kind == "pca":
            evals, evecs = torch.linalg.eigh(self.cc)
            p = evecs[:, -r:]  # [D, r]
            self.a, self.b = (wd @ p).float().contiguous(), p.T.float().contiguous()
        elif self.kind == "bias":  # the mean contribution of the unselected neurons, free
            self.c = (self.zt[-1] / self.zz[-1, -1]).float()
        elif self.kind == "rrr":
            n = self.zz.shape[0]
            reg = ridge * self.zz.diagonal().mean() * torch.eye(n, dtype=torch.float64)
            beta = torch.linalg.solve(self.zz + reg, self.zt)  # [N+1, D]
            fitted_cov = beta.T @ self.zz @ beta  # covariance of the fitted values (uncentred)
            evals, evecs = torch.linalg.eigh(fitted_cov)
            q = evecs[:, -r:]  # [D, r]
            proj = beta @ q  # [N+1, r]
            self.a, self.b = proj[:-1].float().contiguous(), q.T.float().contiguous()
            self.c = (proj[-1] @ q.T).float()
        self.fitting = False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=float, default=0.5)
    ap.add_argument("--kinds", nargs="+", default=["none", "full", "svd", "pca", "rrr"])
    ap.add_argument("--rank", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--tier-b", type=float, nargs="+", default=[0.2, 0.4, 0.6],
                    help="`tier`: this share of the exact neurons' budget goes to sketched neurons (down only)")
    ap.add_argument("--beta", type=float, nargs="+", default=[1.0], help="`tier`: scale of the sketched activations")
    ap.add_argument("--ridge", type=float, default=1e-3)
    study.add_data_args(ap, calib_tokens=8192)
    args = ap.parse_args()
    loaded, heldout, dense, calib, m = study.sketch_setup(args)
    m.set_active(args.active)
    rows = []
    for kind in args.kinds:
        settings = ([(0, 0.0, 1.0)] if kind in ("none", "full", "bias") else [(0, b, beta) for b in args.tier_b for beta in args.beta]
                    if kind == "tier" else [(r, 0.0, 1.0) for r in args.rank])
        for rank, tier_b, beta in settings:
            comps = []
            for layer in m.layers:
                E, _, D = layer.w_in.shape
                per = layer.flops_per_token(1) - layer.flops_per_token(0)
                k = layer.top_k - (math.ceil(2 * rank * (E + D) / per) if rank else 0)
                k_b = 0
                if kind == "tier":  # a sketched neuron costs its down projection alone, 2 D FLOPs
                    k_b = math.floor(tier_b * layer.top_k * per / (2 * D))
                    k = layer.top_k - math.ceil(tier_b * layer.top_k)
                comps.append(Comp(layer, kind, rank, k, k_b, beta))
                layer.forward = comps[-1].forward
            start = time.time()
            with torch.no_grad():
                if comps[0].fitting:  # all layers at once: each sees the sparse model's inputs
                    for i in range(0, len(calib), 4):
                        m.model(calib[i:i + 4])
                    for c in comps:
                        c.finish(args.ridge)
            ppl, seconds = study.timed_perplexity(m.model, heldout)
            rows.append({"active": args.active, "kind": kind, "rank": rank, "k": comps[0].k, "k_b": comps[0].k_b,
                         "beta": beta, "ppl": ppl, "ppl_ratio": ppl / dense, "seconds": time.time() - start})
            print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows, args)


if __name__ == "__main__":
    main()
