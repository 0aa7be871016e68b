"""A study (session 13, not an execution path): the pruned sketch's kept gate and up weights refitted
by ridge regression, so that its sums over a token's kept channels estimate the full sums.

A pruned sketch (`--router-sparsity`) estimates neuron i's gate sum g_i = w_i . x from the token's
c' channels of largest |x| and row i's kept weights S_i: g_hat_i = sum_{j in K(x) & S_i} w_ij x_j.
What it leaves out is biased (the left-out channels correlate with the kept ones). With x_m = x
masked to K(x), the kept weights that estimate g best on calibration text are, per row,

    v_i = argmin_v sum_t (v . x_m[t, S_i] - w_i . x_t)^2 + lam * mean(diag G_SS) * ||v - w_i,S||^2

    G = X_m^T X_m, C = X_m^T X  [D, D], once per layer;  v_i = (G_SS + lam m I)^-1 (C_S w_i + lam m w_i,S)

The pruning masks stay as they are (so do the FLOPs); only the sketch's view changes: the exact
neurons still read the full weights. The layers are refitted in order, each on the inputs the
model gives it with the layers before it refitted (as `moefy.pipeline.refit`); then the score quantiles
are fitted again, and optionally the down rows (`--down LAM`, moefy.pipeline.refit.refit_layer).

    python benchmarks/explore_sketch_refit.py --model runs/smol-a25-sp0.6 --lam 0.1 --down 1.0 \
        --out benchmarks/results/sketch_refit_a25.json
"""

from __future__ import annotations

import argparse

import torch

from moefy.pipeline import refit
from moefy.arch import family_for
from moefy.pipeline.layerwise import block_inputs, run_block
from moefy.modeling.moe_layer import MoEFFN
from moefy.modeling.router_sketch import kept_channels

import study


@torch.no_grad()
def sketch_rows(layer: MoEFFN, x: torch.Tensor, lam: float, chunk: int = 4096, rows_per_solve: int = 128):
    """The refitted sketch rows [E*n, D] (gate, up), zero outside the pruning masks."""
    E, n, D = layer.w_in.shape
    G = torch.zeros(D, D, dtype=torch.float64)
    C = torch.zeros(D, D, dtype=torch.float64)
    for xc in x.split(chunk):
        xc = xc.float()
        idx = kept_channels(xc, layer.router.kept)
        xm = torch.zeros_like(xc).scatter(-1, idx, xc.gather(-1, idx)).double()
        G += xm.T @ xm
        C += xm.T @ xc.double()
    out = []
    for w, m in zip((layer.w_in, layer.w_up), layer._sketch_masks()):
        if w is None:
            out.append(None)
            continue
        W = w.reshape(E * n, D).double()
        keep = int(m[0].sum())
        S = m.nonzero()[:, 1].view(E * n, keep)  # each row's kept columns, sorted
        new = torch.zeros_like(W)
        for a in range(0, E * n, rows_per_solve):
            s, wb = S[a:a + rows_per_solve], W[a:a + rows_per_solve]
            gs = G[s.unsqueeze(-1), s.unsqueeze(-2)]  # [b, k, k]
            mu = gs.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None]  # [b, 1]
            w_s = wb.gather(1, s)
            rhs = torch.einsum("bkd,bd->bk", C[s], wb) + lam * mu * w_s
            gs = gs + torch.diag_embed(lam * mu.expand(-1, keep))
            new[a:a + rows_per_solve].scatter_(1, s, torch.linalg.solve(gs, rhs))
        out.append(new.to(w.dtype))
    return out


def gate_error(layer: MoEFFN, x: torch.Tensor) -> float:
    """Relative error of the sketch's gate sums against the full ones on x."""
    E, n, D = layer.w_in.shape
    idx = kept_channels(x, layer.router.kept)
    xm = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
    full = x @ layer.w_in.reshape(E * n, D).T
    return float((xm @ layer._sketch_rows()[0].T - full).square().sum() / full.square().sum())


@torch.no_grad()
def refit_model(m, blocks, lam: float | None, down: float | None) -> list[dict]:
    family = family_for(m.model.config)
    states = block_inputs(m.model, family, blocks, 8)
    reports, blocks_ = [], family.block_list(m.model)
    for i, block in enumerate(blocks_):
        layer = block.get_submodule(family.ffn)
        x = refit.ffn_inputs(block, layer, states)
        report = {"layer": i}
        probe = x[refit._probe(len(x))]
        if lam is not None:
            report["gate_error_before"] = gate_error(layer, probe.float())
            rows = sketch_rows(layer, x, lam)
            layer._sketch_rows = lambda rows=rows: rows  # the sketch's own view from now on
            layer.__dict__.pop("_derived", None)
            report["gate_error_after"] = gate_error(layer, probe.float())
            if layer.thresholded:
                layer.fit_score_quantiles(x)
        if down is not None:
            report.update(refit.refit_layer(layer, x, down))
        print(report, flush=True)
        reports.append(report)
        if i + 1 < len(blocks_):
            states = [(run_block(block, h, kw), kw) for h, kw in states]
    for layer in m.layers:
        layer.reset_counters()
    return reports


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_saved_model_args(ap)
    ap.add_argument("--lam", type=float, nargs="+", default=[0.1], help="sketch ridge strengths (-1: none)")
    ap.add_argument("--down", type=float, default=None, help="also refit the down rows at this strength")
    args = ap.parse_args()
    dense_ppl, rows = {}, []
    for lam in args.lam:
        m, calib, sets = study.saved_with_data(args, dense_ppl)
        layers = refit_model(m, calib, None if lam < 0 else lam, args.down)
        rows += study.score_sets(m, sets, dense_ppl, {"lam": lam, "down": args.down, "layers": layers})
        study.write(args.out, dense_ppl, next(iter(sets.values())), rows, args)


if __name__ == "__main__":
    main()
