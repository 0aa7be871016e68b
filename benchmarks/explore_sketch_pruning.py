"""A masked study (session 12) that led to `--router-sparsity`: the sketch router reading pruned
gate and up weights, on more channels, at the same FLOPs.

The sketch estimates every neuron's gate and up products from a token's top-c channels (by |x|).
Its error is the sum of the terms it leaves out. Leaving out small weights as well as small
inputs is cheaper per unit of error: each neuron's gate and up rows keep their (1 - s) share of
weights with the largest |w_ij| x ||x_j|| (Wanda's score; ||x_j|| over calibration inputs,
`--prune row`), and the sketch reads c' = c / (1 - s) channels, so that its products cost what c
unpruned channels cost. `--prune col` instead keeps, in each input channel, the (1 - s) share of
neurons with the largest |w_ij|: a fixed count per channel, so the cost is exact, but it was worse.

Every FFN of SmolLM2 is replaced by a plain function (not moefy's execution paths): the sketch
ranks the neurons by |h_hat| x ||w_down||; the top k are computed exactly from all channels, the
next k_b contribute h_hat through their down rows. The budget, active x 3 x I x D products per
token, pays for the sketch (its nonzero share measured as `nnz_share` is reported; the split
assumes c' (1 - s)), then k exact neurons at (3 - 2c) D each with reuse of unpruned sums or 3 D
without, and k_b sketched ones at D each (the approx share of the rest). Fixed top-k, no score
thresholds.

    python benchmarks/explore_sketch_pruning.py --out benchmarks/results/sketch_pruning.json
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from moefy.pipeline import data as data_mod

import study

SETTINGS = {  # active share: (approx share, [(channels c', sparsity s, reuse)])
    0.25: (0.2, [(0.2, 0.0, True), (0.2, 0.0, False), (0.3, 0.33, False), (0.4, 0.5, False), (0.5, 0.6, False),
                 (0.6, 0.667, False), (0.8, 0.75, False), (0.5, 0.5, False), (0.6, 0.583, False)]),
    0.5: (0.3, [(0.4, 0.0, True), (0.53, 0.25, False), (0.6, 0.33, False), (0.8, 0.5, False), (0.7, 0.43, False),
                (0.6, 0.25, False), (0.5, 0.2, False), (0.7, 0.5, False)]),
}


def prune(w: torch.Tensor, norms: torch.Tensor, s: float, mode: str) -> torch.Tensor:
    if s == 0:
        return w
    if mode == "col":
        return w * (w.abs() > w.abs().kthvalue(int(w.shape[0] * s), dim=0, keepdim=True).values)
    score = w.abs() * norms
    return w * (score > score.kthvalue(int(w.shape[1] * s), dim=1, keepdim=True).values)


def ffn_inputs(model, blocks) -> dict[int, torch.Tensor]:
    """Every layer's FFN input on `blocks`, [N, D]."""
    seen: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(i, []).append(a[0].flatten(0, 1)))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(blocks)
    for h in hooks:
        h.remove()
    return {i: torch.cat(v).float() for i, v in seen.items()}


def install(model, norms, active, approx, c, s, reuse, mode, nnz: list):
    D, I = model.config.hidden_size, model.config.intermediate_size
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        pg, pu = prune(wg, norms[i], s, mode), prune(wu, norms[i], s, mode)
        kept = round(c * D)
        rest = active * 3 * I - 2 * (kept / D) * (1 - s) * I
        k = int((1 - approx) * rest / (3 - 2 * kept / D if reuse else 3))
        kb = int(approx * rest)
        col_nnz = (pg != 0).sum(0).float()

        def forward(x, wg=wg, wu=wu, wd=wd, pg=pg, pu=pu, dn=wd.norm(dim=0), kept=kept, k=k, kb=kb, col_nnz=col_nnz):
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            idx = x.abs().topk(kept, -1).indices
            xs = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
            est = F.silu(xs @ pg.T) * (xs @ pu.T)
            nnz.append(float(col_nnz[idx].sum(-1).mean() / (I * D)))
            order = (est.abs() * dn).topk(k + kb, -1).indices
            exact = torch.zeros_like(est, dtype=torch.bool).scatter(-1, order[:, :k], True)
            sketched = torch.zeros_like(exact).scatter(-1, order[:, k:], True)
            h = F.silu(x @ wg.T) * (x @ wu.T)
            return ((h * exact + est * sketched) @ wd.T).reshape(shape)

        mlp.forward = forward
    return k, kb


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_data_args(ap, calib_tokens=4096)
    ap.add_argument("--active", type=float, nargs="+", default=sorted(SETTINGS))
    ap.add_argument("--prune", choices=["row", "col"], default="row")
    args = ap.parse_args()
    loaded, heldout, dense = study.smollm(args.data, args.tokens)
    calib = data_mod.blocks("wiki-sample:calib", loaded.tokenizer, 256, max_tokens=args.calib_tokens)
    norms = {i: x.norm(dim=0) for i, x in ffn_inputs(loaded.model, calib).items()}
    rows = []
    for active in args.active:
        approx, settings = SETTINGS[active]
        for c, s, reuse in settings:
            nnz: list = []
            k, kb = install(loaded.model, norms, active, approx, c, s, reuse, args.prune, nnz)
            ppl, seconds = study.timed_perplexity(loaded.model, heldout)
            rows.append({"active": active, "approx": approx, "channels": c, "sparsity": s, "reuse": reuse,
                         "prune": args.prune, "k": k, "k_b": kb, "nnz_share": sum(nnz) / len(nnz),
                         "nominal_share": c * (1 - s), "ppl": ppl, "ppl_ratio": ppl / dense, "seconds": seconds})
            print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows, args)


if __name__ == "__main__":
    main()
