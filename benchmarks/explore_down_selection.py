"""A masked study (not an execution path): a second, exact selection before the down projection.

With the sketch router and reuse, a selected neuron's gate and up are completed exactly, so its
true contribution |h| x ||w_down|| is known before its down projection. Keep only the top share r
of the selected neurons, by that exact contribution, for the down projection: each selected
neuron then costs gate + up + r x down, so the same FLOPs select more neurons. r = 1 is the
executed sketch model (with reuse).

    python benchmarks/explore_down_selection.py --shared 0 --down 1 0.75 0.5 \
        --out benchmarks/results/down_selection.json
"""

from __future__ import annotations

import argparse
import math

import torch

from moefy.modeling.moe_layer import MoEFFN

import study


def plan(layer: MoEFFN, active: float, down: float) -> int:
    """Neurons selected per token (before the down selection) within `active` of the dense FLOPs."""
    E, n, D = layer.w_in.shape
    assert n == 1 and layer.gated
    per = 2 * D * (2 * (1 - layer.router.kept / D) + down)  # gate + up over the channels left, r x down
    fixed = layer.flops_per_token(0)
    return math.floor((active * layer.dense_flops_per_token() - fixed) / per)


def masked_forward(layer: MoEFFN, x: torch.Tensor, k1: int, down: float) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    E = layer.spec["num_experts"]
    scores = layer.sketch_norms(x, layer.router.kept)  # [T, E]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k1, dim=-1).indices, True)
    h = layer.hidden_all(x)  # exact, [T, E]; only the chosen ones are used
    contrib = (h.abs() * layer.w_out[:, 0].norm(dim=-1)).masked_fill(~chosen, -1.0)
    k2 = max(1, math.ceil(down * k1))
    keep = torch.zeros_like(chosen).scatter_(1, contrib.topk(min(k2, E), dim=-1).indices, True) & chosen
    y = (h * keep) @ layer.w_out[:, 0]
    if layer.shared_in is not None:
        y = y + layer._shared(x)
    return y.reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=float, default=0.0)
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--down", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    ap.add_argument("--channels-scale", type=float, nargs="+", default=[0.6],
                    help="channel share = this x the active share")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded, heldout, dense = study.smollm("wiki-sample:heldout", args.tokens)
    m = study.sketch_model(loaded, shared=args.shared)
    rows = []
    for active in args.active:
        for scale in args.channels_scale:
            channels = min(1.0, scale * active)
            m.set_router_channels(channels)
            for down in args.down:
                ks = [plan(layer, active, down) for layer in m.layers]
                for layer, k in zip(m.layers, ks):
                    layer.forward = (lambda lay, kk: lambda x: masked_forward(lay, x, kk, down))(layer, k)
                ppl, seconds = study.timed_perplexity(m.model, heldout)
                rows.append({"active": active, "channels": channels, "down": down, "k1": ks[0],
                             "k2": max(1, math.ceil(down * ks[0])), "ppl": ppl, "ppl_ratio": ppl / dense,
                             "seconds": seconds})
                print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows, args)


if __name__ == "__main__":
    main()
