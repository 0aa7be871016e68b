"""Quality of each expert-construction method x router at several FFN budgets, dense alongside.

Profiles the model once, builds each (method, router, shared, experts) variant once, and
evaluates it at every --active budget (set_active re-derives each layer's k; grouping and router
training do not depend on k), so each row equals what `moefy convert ... --active A` gives with the
same settings (the command is printed beside each row).

    python benchmarks/methods_table.py --out benchmarks/results/methods_table.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import moefy.io
from moefy import data as data_mod
from moefy import models
from moefy.config import DataConfig, MoEConfig
from moefy.convert import build, calibrate
from moefy.evaluate import evaluate
from moefy.io import write_json

DEFAULT_VARIANTS = ["random:similarity:0:96", "random:mlp:0:96",
                    "param-kmeans:similarity:0:96", "param-kmeans:mlp:0:96",
                    "coactivation:similarity:0:96", "coactivation:mlp:0:96",
                    "coactivation:similarity:0.1:96", "coactivation:mlp:0.1:96"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wiki-sample")
    p.add_argument("--eval-data", default="wiki-sample:heldout")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--variant", nargs="+", default=DEFAULT_VARIANTS, help="method:router:shared:experts")
    p.add_argument("--router-loss", default="log-norm", help="mlp router target (see moefy convert --help)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args()

    loaded = models.load(args.model)
    data = DataConfig(source=args.calib, seq_len=args.seq_len, tokens=args.calib_tokens)
    heldout = data_mod.blocks(args.eval_data, loaded.tokenizer, args.seq_len, max_tokens=args.eval_tokens)
    stats = calibrate(loaded.model, loaded.tokenizer, MoEConfig(method="coactivation"), data)
    rows = []
    for variant in args.variant:
        method, router, shared, experts = variant.split(":")
        cfg = MoEConfig(method=method, router=router, shared=float(shared), num_experts=int(experts),
                        active=max(args.active), router_loss=args.router_loss)
        start = time.time()
        m = build(copy.deepcopy(loaded.model), loaded.tokenizer, stats, cfg)
        build_s = time.time() - start
        recall = sum(r["router_recall"] for r in m.record["layers"]) / len(m.record["layers"])
        for active in args.active:
            m.set_active(active)
            r = evaluate(m, heldout)
            rows.append({"method": method, "router": router, "router_loss": args.router_loss if router == "mlp" else None,
                         "shared": float(shared), "experts": int(experts),
                         "active_target": active, "build_s": build_s, "router_recall_at_max_active": recall,
                         "command": command(args, method, router, shared, experts, active), **r})
            print(json.dumps({k: rows[-1][k] for k in ("method", "router", "shared", "active_target")}),
                  f"ppl {r['moe']['ppl']:.2f} vs dense {r['dense']['ppl']:.2f} ({r['ppl_ratio']:.2f}x), "
                  f"share {r['moe']['active_ffn_share']:.3f}", flush=True)
        del m
        write_json(args.out, {"model": args.model, "eval_data": args.eval_data, "versions": moefy.io.versions(),
                              "rows": rows})  # after every variant: a partial run keeps its rows
    print(markdown(rows))


def command(args, method, router, shared, experts, active):
    shared_flag = f" --shared {shared}" if float(shared) else ""
    loss_flag = f" --router-loss {args.router_loss}" if router == "mlp" else ""
    return (f"moefy convert --model {args.model} --calib {args.calib} --calib-tokens {args.calib_tokens} "
            f"--seq-len {args.seq_len} --experts {experts} --method {method} --router {router}{loss_flag}{shared_flag} "
            f"--active {active} --eval-data {args.eval_data} --eval-tokens {args.eval_tokens} --out runs/x")


def markdown(rows) -> str:
    dense = rows[0]["dense"]
    lines = ["| method | router | shared | active target | PPL | x dense | FFN MFLOPs/token | active FFN share |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | - | - | 1.00 | {dense['ppl']:.2f} | 1.00 | {dense['ffn_flops_per_token'] / 1e6:.1f} | 100% |"]
    for r in rows:
        lines.append(f"| {r['method']} ({r['experts']}) | {r['router']} | {r['shared']:g} | {r['active_target']:.2f} | "
                     f"{r['moe']['ppl']:.2f} | {r['ppl_ratio']:.2f} | {r['moe']['ffn_flops_per_token'] / 1e6:.1f} | "
                     f"{r['moe']['active_ffn_share']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
