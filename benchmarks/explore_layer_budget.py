"""Per-layer FFN budgets from end-to-end sensitivity (issue #4, part 2), a masked study.

For every layer and every candidate share s, only that layer runs sparse at s (all others dense)
and we record the KL divergence of the model's next-token distribution from the dense one on
calibration text. Assuming the layers' KL costs add up, a multiple-choice knapsack (exact DP
on a FLOP grid) picks one share per layer that minimises the summed KL within the model's
budget. The allocation is then evaluated on held-out text against the uniform share.

    python benchmarks/explore_layer_budget.py --shared 0 --out benchmarks/results/layer_budget_sketch.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.eval.evaluate import perplexity
from moefy.modeling.router_sketch import sketch_channels_for

import study

GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 1.0]  # 1.0: the layer runs dense


def set_layer(layer, share):
    """Put one layer at `share` (1.0: dense, no router); its FLOP share, or None if it does not fit."""
    if share >= 1.0:
        layer.all_experts = True
        return 1.0
    layer.all_experts = False
    if hasattr(layer.router, "auto"):
        layer.set_router_channels(sketch_channels_for(share, layer.router.reuse), auto=True)
    k = layer.top_k_for_share(share)
    if k < 1:
        return None
    layer.set_selection(k, None)
    return layer.flops_per_token(k) / layer.dense_flops_per_token()


@torch.no_grad()
def mean_kl(model, blocks, ref_logp, batch_size=4):
    total, count = 0.0, 0
    for b, ref in zip(blocks.split(batch_size), ref_logp.split(batch_size)):
        logp = F.log_softmax(model(input_ids=b).logits.float(), -1)
        total += float((ref.exp() * (ref - logp)).sum())
        count += b.numel()
    return total / count


def allocate(costs, kls, budget, unit=0.005):
    """Exact multiple-choice knapsack on a grid of `unit` layer-FLOPs: one option per layer,
    summed cost <= budget, least summed KL. costs/kls: per layer, lists over options."""
    B = int(round(budget / unit))
    best = np.zeros(B + 1)  # least KL using the layers so far within b units
    choice = []
    for c, v in zip(costs, kls):
        new = np.full(B + 1, np.inf)
        arg = np.full(B + 1, -1)
        for j, (cj, vj) in enumerate(zip(c, v)):
            u = int(np.ceil(cj / unit - 1e-9))
            if u > B:
                continue
            cand = np.full(B + 1, np.inf)
            cand[u:] = best[:B + 1 - u] + vj
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        choice.append(arg)
    b, picks = int(np.argmin(best)), []
    for c, arg in zip(reversed(costs), reversed(choice)):
        j = int(arg[b])
        picks.append(j)
        b -= int(np.ceil(c[j] / unit - 1e-9))
    return picks[::-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=1536)
    ap.add_argument("--shared", type=float, default=0.0)
    ap.add_argument("--router", default="sketch")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--active", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded = models.load("smollm2-135m")
    calib = data_mod.blocks("wiki-sample:calib", loaded.tokenizer, 256, max_tokens=args.calib_tokens)
    heldout = data_mod.blocks("wiki-sample:heldout", loaded.tokenizer, 256, max_tokens=args.tokens)
    with torch.no_grad():
        dense_ppl = perplexity(loaded.model, heldout)[0]
        ref = torch.cat([F.log_softmax(loaded.model(input_ids=b).logits.float(), -1) for b in calib.split(4)])
    m = study.convert(loaded, num_experts=args.experts, shared=args.shared, router=args.router,
                      router_approx=0.0 if args.router == "sketch" else None)
    layers = m.layers
    table = []  # per layer: [(share, flop share, kl)]
    start = time.time()
    for i, layer in enumerate(layers):
        for other in layers:
            other.all_experts = True
        rows = []
        for share in GRID:
            cost = set_layer(layer, share)
            if cost is None:
                continue
            kl = 0.0 if share >= 1.0 else mean_kl(m.model, calib, ref)
            rows.append((share, cost, kl))
        table.append(rows)
        print(i, [(s, round(kl, 4)) for s, _, kl in rows], f"{time.time() - start:.0f}s", flush=True)
    results = []
    for active in args.active:
        for name in ("uniform", "kl"):
            if name == "uniform":
                shares = [active] * len(layers)
            else:
                picks = allocate([[c for _, c, _ in r] for r in table], [[v for *_, v in r] for r in table],
                                 active * len(layers))
                shares = [table[i][j][0] for i, j in enumerate(picks)]
            costs = [set_layer(layer, s) for layer, s in zip(layers, shares)]
            predicted = sum(next(v for s2, _, v in table[i] if s2 == s) for i, s in enumerate(shares)
                            if any(s2 == s for s2, _, _ in table[i]))
            measured = mean_kl(m.model, calib, ref)
            ppl = perplexity(m.model, heldout)[0]
            row = {"active": active, "budget": name, "shares": shares, "flop_share": sum(costs) / len(costs),
                   "kl_predicted": predicted, "kl_calib": measured, "ppl": ppl, "ppl_ratio": ppl / dense_ppl}
            results.append(row)
            print(row, flush=True)
    with open(args.out, "w") as f:
        json.dump({"dense_ppl": dense_ppl, "tokens": int(heldout[:, 1:].numel()), "grid": GRID,
                   "table": table, "results": results, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
