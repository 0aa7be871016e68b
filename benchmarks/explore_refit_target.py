"""A study of the down refit's target (moefy/refit.py fits each layer's output to its own dense
FFN's on the sparse model's inputs). Here the target may also undo the drift the earlier sparse
layers left in the residual stream: for a pre-norm block (Llama), out = h + FFN(norm(h)), so the
FFN output that puts the block's output back on the dense model's is t = out_dense - h_sparse.

    target = (1 - beta) * (B W) + beta * t        # beta 0: refit.py's target

The fit is otherwise refit.py's: ridge toward the rows as converted, the sketch's quantiles
fitted again after it, the layer left as converted when its own output error rises.

    python benchmarks/explore_refit_target.py --model runs/smol-a25 --beta 0 0.5 1 --lam 0.3 \
        --out benchmarks/results/refit_target_a25.json
"""

from __future__ import annotations

import argparse

import torch

from moefy.pipeline import refit
from moefy.arch import family_for
from moefy.pipeline.layerwise import block_inputs, run_block

import study


@torch.no_grad()
def refit_stream(m, blocks: torch.Tensor, lam: float, beta: float, batch_size: int = 8) -> list[dict]:
    model = m.model
    family = family_for(model.config)
    sparse = block_inputs(model, family, blocks, batch_size)
    dense = [(h.clone(), kw) for h, kw in sparse]
    reports = []
    for block in family.block_list(model):
        layer = block.get_submodule(family.ffn)
        with m.all_experts():  # the dense block, before this layer's rows change
            dense = [(run_block(block, h, kw), kw) for h, kw in dense]
        xs, targets = [], []
        for (h, kw), (d, _) in zip(sparse, dense):
            got = {}
            handle = layer.register_forward_hook(lambda _m, a, y: got.update(x=a[0], y=y))
            try:
                out = run_block(block, h, kw)
            finally:
                handle.remove()
            x = got["x"].reshape(-1, got["x"].shape[-1])
            xs.append(x)
            targets.append((d - (out - got["y"])).reshape(-1, x.shape[-1]))  # out_dense - h_sparse
        x, t = torch.cat(xs), torch.cat(targets)
        reports.append(fit(layer, x, t, lam, beta))
        sparse = [(run_block(block, h, kw), kw) for h, kw in sparse]
        print(len(reports) - 1, reports[-1], flush=True)
    for layer in m.layers:
        layer.reset_counters()
    return reports


def fit(layer, x, t, lam, beta, chunk=4096) -> dict:
    probe = refit._probe(len(x))
    dense_y = refit._dense_outputs(layer, x[probe])
    before = refit.output_error(layer, x[probe], dense_y)
    w32 = refit._down_rows(layer).float()
    bias = 0 if layer.b_out is None else layer.b_out
    fitted = refit.ridge_rows(layer, x, lam, target=lambda bw, s: (1 - beta) * bw + beta * (t[s] - bias), chunk=chunk)
    saved = (layer.router.grid, layer.router.quantiles.clone())
    refit._set_down_rows(layer, fitted)
    layer.fit_score_quantiles(x)
    after = refit.output_error(layer, x[probe], dense_y)
    kept = after < before or beta > 0  # with a stream target the layer's own error may rise on purpose
    if not kept:
        refit._set_down_rows(layer, w32)
        layer.router.set_quantiles(*saved)
    layer.reset_counters()
    return {"error_before": before, "error_after": after, "kept": kept}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--lam", type=float, default=0.3)
    study.add_saved_model_args(ap)
    args = ap.parse_args()
    rows, dense_ppl = [], {}
    for beta in args.beta:
        m, calib, sets = study.saved_with_data(args, dense_ppl)
        layers = refit_stream(m, calib, args.lam, beta)
        rows += study.score_sets(m, sets, dense_ppl, {"beta": beta, "lam": args.lam, "layers": layers})
    study.write(args.out, dense_ppl[args.data[0]], sets[args.data[0]], rows, args)


if __name__ == "__main__":
    main()
