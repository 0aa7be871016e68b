"""A masked study (not an execution path): a sketch in two stages, each reusing the other's sums.

The executed sketch (with reuse) sums every routed neuron's gate and up over the token's top share
c of input channels, selects k neurons and completes their sums. Most of the sketch's work goes to
neurons that are then not selected (68% of them at 50% active). Two stages spend less there:

1. every neuron's sums over the top c1 channels (c1 < c2) -> keep the top share f1 as candidates;
2. the candidates' sums are extended to the top c2 channels -> select k of them;
3. the k selected neurons complete their sums over the channels left and are computed exactly.

The channel sets are nested (both are a token's largest |x|), so no sum is computed twice. Cost per
token, in multiply-adds: 2 D (c1 N + (c2 - c1) f1 N + (1 - c2) k) + D k for the down projection;
k is the most that fits in the active share of the dense FFN. c1 = c2 is the executed sketch.

    python benchmarks/explore_sketch_stages.py --out benchmarks/results/sketch_stages.json
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN

import study


def plan(N: int, D: int, active: float, c1: float, f1: float, c2: float) -> int:
    """Neurons selected per token within `active` of the dense FFN's 3 D N multiply-adds."""
    fixed = 2 * D * (c1 * N + (c2 - c1) * math.ceil(f1 * N))
    return min(math.ceil(f1 * N), math.floor((active * 3 * D * N - fixed) / (D * (2 * (1 - c2) + 1))))


def masked_forward(layer: MoEFFN, x: torch.Tensor, c1: float, f1: float, c2: float, k: int, stats: dict):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    T, D = x.shape
    wg, wu, wd = layer.w_in[:, 0], layer.w_up[:, 0], layer.w_out[:, 0]
    down = wd.norm(dim=-1)
    act = ACTIVATIONS[layer.act]
    order = x.abs().argsort(dim=-1, descending=True)

    def partial(c):
        idx = order[:, : max(1, round(c * D))]
        xs = torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))
        return (act(xs @ wg.T) * (xs @ wu.T)).abs() * down

    N = wg.shape[0]
    s2 = partial(c2)
    if c1 < c2:
        cand = torch.zeros_like(s2, dtype=torch.bool).scatter_(1, partial(c1).topk(math.ceil(f1 * N), -1).indices, True)
        s2 = s2.masked_fill(~cand, -1.0)
    chosen = torch.zeros_like(s2, dtype=torch.bool).scatter_(1, s2.topk(k, dim=-1).indices, True)
    h = layer.hidden_all(x)
    true = h.abs() * down
    best = torch.zeros_like(chosen).scatter_(1, true.topk(k, dim=-1).indices, True)
    stats["recall"] += (chosen & best).sum().item() / (k * T)
    stats["n"] += 1
    y = (h * chosen) @ wd
    if layer.shared_in is not None:
        y = y + layer._shared(x)
    return y.reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--active", type=float, default=0.5)
    ap.add_argument("--c2", type=float, nargs="+", default=[0.4])
    ap.add_argument("--c1", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    ap.add_argument("--f1", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--data", default="wiki-sample:heldout")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded, heldout, dense = study.smollm(args.data, args.tokens)
    m = study.sketch_model(loaded)
    N, D = 1536, m.layers[0].w_in.shape[-1]
    grid = [(c2, 1.0, c2) for c2 in args.c2] + [
        (c1, f1, c2) for c2, c1, f1 in itertools.product(args.c2, args.c1, args.f1) if c1 < c2]
    rows = []
    for c1, f1, c2 in grid:
        k = plan(N, D, args.active, c1, f1, c2)
        if k <= 0:
            continue
        stats = {"recall": 0.0, "n": 0}
        for layer in m.layers:
            layer.forward = (lambda lay: lambda x: masked_forward(lay, x, c1, f1, c2, k, stats))(layer)
        ppl, seconds = study.timed_perplexity(m.model, heldout)
        rows.append({"active": args.active, "c1": c1, "f1": f1, "c2": c2, "k": k, "neurons": k / N, "ppl": ppl,
                     "ppl_ratio": ppl / dense, "recall": stats["recall"] / stats["n"], "seconds": seconds})
        print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows, args)


if __name__ == "__main__":
    main()
