"""A study of the down refit in rounds (moefy/refit.py fits once, on the selection as converted).
Each fit assumes a selection, and the new rows' norms change it (the sketch ranks by them). Here
the fit is repeated: round r fits the rows on the selection the rows of round r-1 make, always
toward the dense output B W0 and with the ridge toward the converted rows W0, and the score
quantiles are fitted again after each round.

    python benchmarks/explore_refit_rounds.py --model runs/smol-a25 --rounds 2 --lam 0.3 \
        --out benchmarks/results/refit_rounds_a25.json
"""

from __future__ import annotations

import argparse

import torch

from moefy.pipeline import refit
from moefy.arch import family_for
from moefy.pipeline.layerwise import block_inputs, run_block

import study


@torch.no_grad()
def fit_rounds(layer, x, lam: float, rounds: int, chunk: int = 4096) -> dict:
    probe = refit._probe(len(x))
    dense_y = refit._dense_outputs(layer, x[probe])
    errors = [refit.output_error(layer, x[probe], dense_y)]
    w0 = refit._down_rows(layer).clone()
    for _ in range(rounds):  # toward the dense output B W0 and the converted rows W0, on this round's selection
        refit._set_down_rows(layer, refit.ridge_rows(layer, x, lam, rows=w0, chunk=chunk))
        layer.fit_score_quantiles(x)
        errors.append(refit.output_error(layer, x[probe], dense_y))
    layer.reset_counters()
    return {"errors": errors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lam", type=float, nargs="+", default=[0.3])
    study.add_saved_model_args(ap)
    args = ap.parse_args()
    rows, dense_ppl = [], {}
    for lam in args.lam:
        m, calib, sets = study.saved_with_data(args, dense_ppl)
        family = family_for(m.model.config)
        states = block_inputs(m.model, family, calib, 8)
        layers = []
        for block in family.block_list(m.model):
            layer = block.get_submodule(family.ffn)
            layers.append(fit_rounds(layer, refit.ffn_inputs(block, layer, states), lam, args.rounds))
            print(len(layers) - 1, layers[-1], flush=True)
            states = [(run_block(block, h, kw), kw) for h, kw in states]
        rows += study.score_sets(m, sets, dense_ppl, {"lam": lam, "rounds": args.rounds, "layers": layers})
    study.write(args.out, dense_ppl[args.data[0]], sets[args.data[0]], rows, args)


if __name__ == "__main__":
    main()
