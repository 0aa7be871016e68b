"""Sketch router (one-neuron experts): held-out perplexity for several channel shares and FFN
compute shares, from one profile and one build per (experts, shared) setting.

    python benchmarks/sketch_table.py --experts 1536 --shared 0.1 --channels 0.2 0.3 0.4 \
        --out benchmarks/results/sketch_table_shared0.1.json
    python benchmarks/sketch_table.py --experts 1536 --shared 0 --channels 0.15 0.2 0.3 0.4 \
        --out benchmarks/results/sketch_table_shared0.json
    python benchmarks/sketch_table.py --shared 0 --channels 0.15 0.2 0.3 0.4 --reuse 0 1 \
        --out benchmarks/results/sketch_table_reuse.json

Each row equals `moefy eval RUN --router-channels C --active A --tokens 4096` on the model
`moefy convert --router sketch --experts E --shared S` writes (the sketch router has no
weights, so the channel share is a setting of the saved model). `--reuse 0 1` scores each
setting with and without the selected neurons completing the sketch's partial sums (the
default since session 6; the rows before it had none).
"""

from __future__ import annotations

import argparse

from moefy.errors import ConfigError

import study


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=1536)
    ap.add_argument("--shared", type=float, default=0.1)
    ap.add_argument("--channels", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--reuse", type=int, nargs="+", default=[1], choices=[0, 1])
    ap.add_argument("--approx", type=float, default=0.0, help="sketched experts' share (--router-approx)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded, heldout, dense = study.smollm("wiki-sample:heldout", args.tokens)
    m = study.sketch_model(loaded, experts=args.experts, shared=args.shared, approx=args.approx)
    rows = []
    for channels, reuse, active in ((c, r, a) for c in args.channels for r in args.reuse for a in args.active):
        m.set_router_channels(channels)
        m.set_router_reuse(bool(reuse))
        row = {"experts": args.experts, "shared": args.shared, "channels": channels, "reuse": bool(reuse),
               "active": active}
        try:
            m.set_active(active)
        except ConfigError as exc:  # the router and shared neurons alone exceed the share
            rows.append({**row, "error": str(exc)})
            print(rows[-1], flush=True)
            continue
        ppl, seconds = study.timed_perplexity(m.model, heldout)
        layer = m.layers[0]
        rows.append({**row, "top_k": layer.top_k, "ppl": ppl, "ppl_ratio": ppl / dense,
                     "active_ffn_share": layer.flops_per_token(layer.top_k) / layer.dense_flops_per_token(),
                     "seconds": seconds})
        print(rows[-1], flush=True)
    study.write(args.out, dense, heldout, rows)


if __name__ == "__main__":
    main()
