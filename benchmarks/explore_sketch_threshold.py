"""A masked study (not an execution path): a threshold on the sketch's scores instead of a fixed top-k.

The sketch router gives every token the same number of exact neurons (and of sketched ones).
Tokens differ: some have a few large contributions, some many middling ones. A per-layer
threshold on the score |h_hat| x ||w_down|| lets the count follow the token, at the same mean
count. The thresholds are fitted on calibration text, by pooling the scores each layer sees in
the sparse (top-k) model, so that the mean counts match the top-k's; the held-out mean counts are
then measured, and the FLOP share they cost is reported with the perplexity.

- `topk`: the executed selection (k exact, then k_b sketched);
- `abs`: exact iff score >= t1, sketched iff t2 <= score < t1;
- `rel`: the same on score / ||score||_2 of the token (a share of the token's own scores);
- `dense`: `abs` with thresholds fitted on the dense model's inputs instead (what a conversion has);
- `global`: `abs` with one pair of thresholds for all layers (the layers' counts then differ).

    python benchmarks/explore_sketch_threshold.py --active 0.5 0.25 \
        --out benchmarks/results/sketch_threshold.json
"""

from __future__ import annotations

import argparse
import math

import torch

from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN

import study


class Layer:
    def __init__(self, layer: MoEFFN, k: int, k_b: int):
        self.layer, self.k, self.k_b = layer, k, k_b
        self.mode = "topk"
        self.pool = []  # sampled scores while fitting
        self.t1 = self.t2 = None
        self.count1 = self.count2 = 0.0
        self.tokens = 0

    def scores(self, x):
        lay = self.layer
        act = ACTIVATIONS[lay.act]
        idx = x.abs().topk(lay.router.kept, dim=-1).indices
        xs = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
        est = act(xs @ lay.w_in[:, 0].T) * (xs @ lay.w_up[:, 0].T)
        s = est.abs() * lay.w_out[:, 0].norm(dim=-1)
        return est, s

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        est, s = self.scores(x)
        wd = self.layer.w_out[:, 0]
        if self.mode.endswith("rel"):
            s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.mode.startswith("fit-"):
            sub = s[:, torch.randperm(s.shape[1])[:256]]
            self.pool.append(sub.flatten())
        if self.mode == "fit-dense":
            return (self.layer.hidden_all(x) @ wd).reshape(shape)
        if self.mode in ("topk", "fit-abs", "fit-rel", "fit-global"):
            top = s.topk(self.k + self.k_b, dim=-1).indices
            exact = torch.zeros_like(s, dtype=torch.bool).scatter_(1, top[:, :self.k], True)
            sketched = torch.zeros_like(exact).scatter_(1, top[:, self.k:], True)
        else:
            exact = s >= self.t1
            sketched = (s >= self.t2) & ~exact
        self.count1 += exact.sum().item()
        self.count2 += sketched.sum().item()
        self.tokens += x.shape[0]
        h = self.layer.hidden_all(x)
        y = (h * exact) @ wd + (est * sketched) @ wd
        return y.reshape(shape)

    def fit(self, pool=None):
        pool = torch.cat(self.pool) if pool is None else pool
        N = self.layer.w_out.shape[0]
        q1 = 1 - self.k / N
        q2 = 1 - (self.k + self.k_b) / N
        srt = pool.sort().values
        self.t1 = srt[min(len(srt) - 1, int(q1 * len(srt)))].item()
        self.t2 = srt[min(len(srt) - 1, int(q2 * len(srt)))].item() if self.k_b else self.t1
        self.pool = []

    def reset(self):
        self.count1 = self.count2 = 0.0
        self.tokens = 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--approx", type=float, nargs="+", default=[0.0, 0.3],
                    help="share of the exact neurons' budget given to sketched neurons")
    ap.add_argument("--modes", nargs="+", default=["topk", "abs", "rel"])
    study.add_data_args(ap, calib_tokens=4096)
    args = ap.parse_args()
    loaded, heldout, dense, calib, m = study.sketch_setup(args)
    rows = []
    for active in args.active:
        m.set_active(active)
        for approx in args.approx:
            wraps = []
            for layer in m.layers:
                D = layer.w_in.shape[-1]
                per = layer.flops_per_token(1) - layer.flops_per_token(0)
                k_b = math.floor(approx * layer.top_k * per / (2 * D))
                k = layer.top_k - math.ceil(approx * layer.top_k)
                wraps.append(Layer(layer, k, k_b))
                layer.forward = wraps[-1].forward
            for mode in args.modes:
                if mode != "topk":
                    for w in wraps:
                        w.mode = "fit-" + mode
                    with torch.no_grad():
                        for i in range(0, len(calib), 4):
                            m.model(calib[i:i + 4])
                    if mode == "global":
                        pool = torch.cat([torch.cat(w.pool) for w in wraps])
                        for w in wraps:
                            w.fit(pool)
                    else:
                        for w in wraps:
                            w.fit()
                for w in wraps:
                    w.mode = "abs" if mode in ("dense", "global") else mode
                    w.reset()
                ppl, seconds = study.timed_perplexity(m.model, heldout)
                flops = dense_flops = 0.0
                for w in wraps:
                    lay = w.layer
                    D = lay.w_in.shape[-1]
                    per = lay.flops_per_token(1) - lay.flops_per_token(0)
                    n1, n2 = w.count1 / w.tokens, w.count2 / w.tokens
                    flops += lay.flops_per_token(0) + n1 * per + n2 * 2 * D
                    dense_flops += lay.dense_flops_per_token()
                rows.append({"active": active, "approx": approx, "mode": mode, "k": wraps[0].k, "k_b": wraps[0].k_b,
                             "mean_exact": sum(w.count1 / w.tokens for w in wraps) / len(wraps),
                             "mean_sketched": sum(w.count2 / w.tokens for w in wraps) / len(wraps),
                             "active_measured": flops / dense_flops, "ppl": ppl, "ppl_ratio": ppl / dense,
                             "seconds": seconds})
                print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows, args)


if __name__ == "__main__":
    main()
