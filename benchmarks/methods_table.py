"""Quality of each expert-construction method x router at several FFN budgets, dense alongside.

The same engine as `moefy sweep` (moefy/sweep.py: profile once, build each variant once, evaluate
it at every --active budget), plus the `moefy convert` command that reproduces each row.

    python benchmarks/methods_table.py --out benchmarks/results/methods_table.json
"""

from __future__ import annotations

import argparse

import moefy.io
from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.config import DataConfig, MoEConfig
from moefy.io import write_json
from moefy.eval.sweep import Variant, markdown, sweep

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
    variants = [Variant.parse(v) for v in args.variant]

    def save(rows):  # after every point: a partial run keeps its rows
        for r in rows:
            r.setdefault("router_loss", args.router_loss if r["router"] == "mlp" else None)
            r.setdefault("command", command(args, r["method"], r["router"], r["shared"], r["experts"], r["active_target"]))
        write_json(args.out, {"model": args.model, "eval_data": args.eval_data, "versions": moefy.io.versions(),
                              "rows": rows})
        r = rows[-1]
        if "skipped" not in r:
            print(r["variant"], r["active_target"], f"ppl {r['moe']['ppl']:.2f} vs dense {r['dense']['ppl']:.2f} "
                  f"({r['ppl_ratio']:.2f}x), share {r['moe']['active_ffn_share']:.3f}", flush=True)

    rows = sweep(loaded, variants, args.active, heldout, MoEConfig(router_loss=args.router_loss), data, on_row=save)
    print(markdown(rows))


def command(args, method, router, shared, experts, active):
    shared_flag = f" --shared {shared}" if float(shared) else ""
    loss_flag = f" --router-loss {args.router_loss}" if router == "mlp" else ""
    return (f"moefy convert --model {args.model} --calib {args.calib} --calib-tokens {args.calib_tokens} "
            f"--seq-len {args.seq_len} --experts {experts} --method {method} --router {router}{loss_flag}{shared_flag} "
            f"--active {active} --eval-data {args.eval_data} --eval-tokens {args.eval_tokens} --out runs/x")


if __name__ == "__main__":
    main()
