"""Quality study (not an execution path): per-token neuron selection for SwiGLU FFNs.

For every layer and token keep a share f of the FFN neurons and zero the rest, chosen by
  oracle:  the largest |h_i| = |silu(g_i) u_i| (perfect knowledge, the per-token limit)
  gate:    the largest |silu(g_i)| * E|u_i| (g computed exactly; E|u_i| from calibration)
and report held-out perplexity against dense. This masks a dense computation on purpose, to
measure quality only; the FLOP share of "gate" would be 1/3 (the exact gate) + 2/3 * f.

    python benchmarks/explore_gate_selection.py --shares 0.5 0.25 0.125
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.eval.evaluate import perplexity


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wiki-sample")
    p.add_argument("--eval-data", default="wiki-sample:heldout")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    loaded = models.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    mlps = [layer.mlp for layer in model.model.layers]
    calib = data_mod.blocks(args.calib, tok, 256, max_tokens=args.calib_tokens)
    heldout = data_mod.blocks(args.eval_data, tok, 256, max_tokens=args.eval_tokens)

    # E|u_i| per layer from calibration text.
    up_abs = [torch.zeros(m.up_proj.out_features) for m in mlps]
    counts = [0]
    hooks = [m.up_proj.register_forward_hook(lambda _m, _a, out, i=i: up_abs[i].add_(out.abs().flatten(0, 1).sum(0)))
             for i, m in enumerate(mlps)]
    with torch.no_grad():
        for b in calib.split(8):
            model(input_ids=b)
            counts[0] += b.numel()
    for h in hooks:
        h.remove()
    up_mean = [u / counts[0] for u in up_abs]

    dense_ppl, n = perplexity(model, heldout)
    results = {"dense_ppl": dense_ppl, "tokens": n, "rows": []}
    print(f"dense {dense_ppl:.3f}", flush=True)
    originals = [m.forward for m in mlps]
    for share in args.shares:
        for rule in ("oracle", "gate"):
            for i, m in enumerate(mlps):
                m.forward = masked_forward(m, share, rule, up_mean[i])
            ppl, _ = perplexity(model, heldout)
            flops = 1 / 3 + 2 / 3 * share if rule == "gate" else share
            results["rows"].append({"rule": rule, "neuron_share": share, "ffn_flop_share": flops, "ppl": ppl,
                                    "ratio": ppl / dense_ppl})
            print(f"{rule:6s} share {share:.3f} (FFN FLOPs {flops:.2f}): ppl {ppl:.3f} ({ppl / dense_ppl:.2f}x)",
                  flush=True)
            for m, f in zip(mlps, originals):
                m.forward = f
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def masked_forward(mlp, share, rule, up_mean):
    k = max(1, round(share * mlp.up_proj.out_features))

    def forward(x):
        g = F.silu(mlp.gate_proj(x))
        u = mlp.up_proj(x)
        h = g * u
        score = h.abs() if rule == "oracle" else g.abs() * up_mean
        keep = torch.zeros_like(h).scatter_(-1, score.topk(k, dim=-1).indices, 1.0)
        return mlp.down_proj(h * keep)

    return forward


if __name__ == "__main__":
    main()
