"""Masked quality study behind the sketch router (not an execution path): held-out perplexity of
SmolLM2-135M when every FFN computes only part of its work, on 4,096 wiki-sample:heldout tokens.

    python benchmarks/explore_input_sparsity.py --mode teal       # one stage, TEAL-style
    python benchmarks/explore_input_sparsity.py --mode two-stage  # sketch, then exact neurons

teal: gate and up read each token's top share p of input channels by |x| (TEAL, Liu et al.
2024); the down projection reads the top share q of the resulting |h| x ||w_down,i||. FFN FLOPs
share (2p + q) / 3.
two-stage: the same sketch (share p of channels) only ranks the neurons; the top share q are
computed exactly from every channel. FLOPs share 2p/3 + q (the sketch's partial sums are not
reused), or with --reuse 2p/3 + q (1 - 2p/3) (the selected neurons add only the other channels).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.eval.evaluate import perplexity

GRID = {
    "teal": [(0.5, 0.5), (0.625, 0.25), (0.35, 0.8), (0.25, 0.25), (0.3125, 0.125), (0.2, 0.35)],
    "two-stage": [(0.5, p) for p in (0.1, 0.15, 0.2, 0.25, 0.3)]
                 + [(0.25, p) for p in (0.1, 0.12, 0.15, 0.18, 0.25)],  # (FLOPs share, p)
}


def top_share(a: torch.Tensor, share: float) -> torch.Tensor:
    idx = a.topk(max(1, round(share * a.shape[-1])), dim=-1).indices
    return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=sorted(GRID), required=True)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    loaded = models.load("smollm2-135m")
    heldout = data_mod.blocks("wiki-sample:heldout", loaded.tokenizer, 256, max_tokens=args.tokens)
    setting = {}

    def forward(mlp, x):
        wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        if setting.get("p") is None:
            return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
        xs = x * top_share(x.abs(), setting["p"])
        sketch = F.silu(xs @ wg.T) * (xs @ wu.T)
        keep = top_share(sketch.abs() * wd.norm(dim=0), setting["q"])
        h = sketch if args.mode == "teal" else F.silu(x @ wg.T) * (x @ wu.T)
        return (h * keep) @ wd.T

    for block in loaded.model.model.layers:
        block.mlp.forward = lambda x, mlp=block.mlp: forward(mlp, x)
    with torch.no_grad():
        dense = perplexity(loaded.model, heldout)[0]
    print(f"dense {dense:.3f}")
    for a, b in GRID[args.mode]:
        if args.mode == "teal":
            p, q = a, b
            total = (2 * p + q) / 3
        else:
            total, p = a, b
            q = (total - 2 * p / 3) / (1 - 2 * p / 3) if args.reuse else total - 2 * p / 3
        setting.update(p=p, q=q)
        start = time.time()
        with torch.no_grad():
            ppl = perplexity(loaded.model, heldout)[0]
        print(f"FLOPs {total:.1%} p={p} q={q:.3f}: ppl {ppl:.3f} ({ppl / dense:.2f}x) {time.time() - start:.0f}s",
              flush=True)


if __name__ == "__main__":
    main()
