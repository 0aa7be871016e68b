"""A study of the saved sketch model (the weights change, the execution paths do not): refit each
layer's down rows by ridge regression so that the neurons a token keeps make up for those it drops.

The sketch model's FFN output is sum_j m_j h_j w_j over its selected neurons (h_j exact, or the
sketch's estimate for a sketched neuron; m_j = 0 for the rest). The dense output is sum_j h_j w_j
over all of them. With the selection fixed, the down rows W' that bring the first closest to the
second on calibration text are a least-squares fit, one per layer:

    W' = argmin ||H_m W' - H W||^2 + lam ||W' - W||^2,    H_m = the masked activations [T, N]

The ridge term pulls W' toward W (lam is a share of the mean diagonal of H_m^T H_m). The fit
sees the sparse model's own inputs: the layers are fitted in order, in one forward pass of the
calibration text, each on the inputs the layers already refitted before it give.

- `--norms keep`: the sketch still ranks by the original rows' norms (the selection the fit assumed);
- `--norms keep-refit`: the same, and the score quantiles are fitted again on the inputs the
  refitted layers give (the share then stays the budget's);
- `--norms refit`: it ranks by the new rows' norms, and the score quantiles are fitted again.
- `--kinds full scale`: every down row fitted freely, or only a factor per row.

    python benchmarks/explore_down_refit.py --model runs/smol-sketch-thr --lam 0.01 0.1 \
        --out benchmarks/results/down_refit.json
"""

from __future__ import annotations

import argparse
import itertools

import torch

from moefy.pipeline import data as data_mod
from moefy import io
from moefy.pipeline import refit
from moefy.eval.evaluate import compute, perplexity

import study


def layer_fit(layer, x: torch.Tensor, lam: float, kind: str = "full") -> torch.Tensor:
    """The refitted down rows [N, D] of a one-neuron-expert sketch layer on its inputs x [T, D]:
    `full` fits every row freely, `scale` only one factor per row (ridge toward 1)."""
    E = layer.w_in.shape[0]
    hm, h = refit._activations(layer, x)  # the layer's masked activations (no shared neurons here) and all
    w = layer.w_out[:, 0].double()
    hm, h = hm.double(), h.double()
    gram = hm.T @ hm
    if kind == "scale":  # sum_t ||sum_j hm_tj s_j w_j - y_t||^2 in s: Gram (hm) o Gram (w)
        a = gram * (w @ w.T)
        b = (hm * (h @ w @ w.T)).sum(0)
        ridge = lam * a.diagonal().mean()
        s = torch.linalg.solve(a + ridge * torch.eye(E, dtype=a.dtype), b + ridge)
        return (s[:, None] * w).float()
    ridge = lam * gram.diagonal().mean()
    rhs = hm.T @ (h @ w) + ridge * w
    return torch.linalg.solve(gram + ridge * torch.eye(E, dtype=gram.dtype), rhs).float()


def keep_norms(layer, norms: torch.Tensor):
    """Rank by the original down rows' norms from now on (the cached sketch weights' third item)."""
    make = type(layer)._sketch_weights.__get__(layer)
    layer._sketch_weights = lambda: (*make()[:2], norms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smol-sketch-thr")
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--approx", type=float, nargs="+", default=[0.3, 0.2], help="one per --active")
    ap.add_argument("--lam", type=float, nargs="+", default=[0.01, 0.1])
    ap.add_argument("--norms", nargs="+", default=["keep", "refit"])
    ap.add_argument("--kinds", nargs="+", default=["full"])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--data", nargs="+", default=["wiki-sample:heldout", "pydoc:heldout"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    m = io.load(args.model)
    tok = m.tokenizer
    calib = data_mod.blocks("wiki-sample:calib", tok, 256, max_tokens=args.calib_tokens)
    sets = {}
    for d in args.data:
        blocks = data_mod.blocks(d, tok, 256, max_tokens=args.tokens)
        with torch.no_grad(), m.all_experts():
            sets[d] = (blocks, perplexity(m.model, blocks)[0])
    layers = m.layers
    originals = [(layer.w_out.detach().clone(), layer.router.grid, layer.router.quantiles.clone()) for layer in layers]

    def restore(keep: bool):
        """The saved model's down rows and score quantiles; `keep`: rank by these rows' norms for good."""
        for layer, (w, grid, quantiles) in zip(layers, originals):
            with torch.no_grad():
                layer.w_out.copy_(w)
            layer.router.set_quantiles(grid, quantiles.clone())
            layer.__dict__.pop("_sketch_weights", None)
            if keep:
                keep_norms(layer, w[:, 0].norm(dim=-1))

    rows = []

    def score(row):
        for d, (blocks, dense) in sets.items():
            for layer in layers:
                layer.reset_counters()
            ppl, seconds = study.timed_perplexity(m.model, blocks)
            share = compute(m)["active_ffn_share"]
            rows.append({**row, "data": d, "ppl": ppl, "dense_ppl": dense, "ppl_ratio": ppl / dense,
                         "active_measured": share, "seconds": seconds})
            print(rows[-1], flush=True)

    for active, approx in zip(args.active, args.approx):
        restore(False)
        m.set_router_approx(approx)
        m.set_active(active)
        score({"active": active, "approx": approx, "fit": "none"})
        for kind, lam, norms in itertools.product(args.kinds, args.lam, args.norms):
            restore(norms.startswith("keep"))
            fitted = []

            def fit(layer, a):
                x = a[0].reshape(-1, a[0].shape[-1])
                with torch.no_grad():
                    layer.w_out[:, 0].copy_(layer_fit(layer, x, lam, kind))
                fitted.append(x)

            hooks = [layer.register_forward_pre_hook(fit) for layer in layers]
            try:
                with torch.no_grad():
                    m.model.model(input_ids=calib)  # the base model: no logits for the whole batch
            finally:
                for hk in hooks:
                    hk.remove()
            if norms.endswith("refit"):
                for layer, x in zip(layers, fitted):
                    layer.fit_score_quantiles(x)
            fitted.clear()
            score({"active": active, "approx": approx, "fit": "sequential", "kind": kind, "lam": lam, "norms": norms})
    study.write(args.out, sets[args.data[0]][1], sets[args.data[0]][0], rows, args)


if __name__ == "__main__":
    main()
