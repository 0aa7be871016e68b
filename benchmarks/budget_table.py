"""Uniform vs sensitivity-allocated per-layer budgets on the same converted model.

Converts once with --budget sensitivity (which records each layer's error curve), then evaluates
both allocations at each active share on the same held-out tokens (same experts, same routers):

    python benchmarks/budget_table.py --out benchmarks/results/budget_table.json --save runs/smol-384-sens
"""

from __future__ import annotations

import argparse

import moefy
from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.config import DataConfig, MoEConfig
from moefy.eval.evaluate import dense_reference
from moefy.io import versions, write_json

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="smollm2-135m")
p.add_argument("--experts", type=int, default=384)
p.add_argument("--shared", type=float, default=0.1)
p.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
p.add_argument("--eval-data", nargs="+", default=["wiki-sample:heldout"])
p.add_argument("--save", help="also save the converted model here (to re-allocate later without converting)")
p.add_argument("--out", required=True)
args = p.parse_args()

loaded = models.load(args.model)
cfg = MoEConfig(num_experts=args.experts, shared=args.shared, active=max(args.active), budget="sensitivity")
m = moefy.convert(loaded, moe=cfg, data=DataConfig())
if args.save:
    moefy.save(m, args.save, overwrite=True)
rows = []
for data in args.eval_data:
    heldout = data_mod.blocks(data, m.tokenizer, 256, max_tokens=8192)
    reference = dense_reference(m, heldout)
    for active in args.active:
        for budget in ("uniform", "sensitivity"):
            m.set_active(active, budget=budget)
            r = moefy.evaluate(m, heldout, reference=reference)
            rows.append({"data": data, "active": active, "budget": budget,
                         "top_k": [layer.top_k for layer in m.layers], **r})
            print(f"{data} {active} {budget}: {r['moe']['ppl']:.2f} ({r['ppl_ratio']:.2f}x) at "
                  f"{r['moe']['active_ffn_share']:.1%}; k = {rows[-1]['top_k']}", flush=True)
            write_json(args.out, {"model": args.model, "moe": cfg.to_dict(), "versions": versions(), "rows": rows,
                                  "error_curves": [r["error_curve"] for r in m.record["layers"]]})
