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
import json
import time

import torch

from moefy import data as data_mod
from moefy import models
from moefy.config import DataConfig, MoEConfig
from moefy.convert import build, calibrate
from moefy.errors import ConfigError
from moefy.evaluate import perplexity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=1536)
    ap.add_argument("--shared", type=float, default=0.1)
    ap.add_argument("--channels", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    ap.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--reuse", type=int, nargs="+", default=[1], choices=[0, 1])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    loaded = models.load("smollm2-135m")
    heldout = data_mod.blocks("wiki-sample:heldout", loaded.tokenizer, 256, max_tokens=args.tokens)
    with torch.no_grad():
        dense = perplexity(loaded.model, heldout)[0]
    cfg = MoEConfig(num_experts=args.experts, shared=args.shared, router="sketch")
    m = build(loaded.model, loaded.tokenizer, calibrate(loaded.model, loaded.tokenizer, cfg, DataConfig()), cfg)
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
        start = time.time()
        with torch.no_grad():
            ppl = perplexity(m.model, heldout)[0]
        layer = m.layers[0]
        rows.append({**row, "top_k": layer.top_k, "ppl": ppl, "ppl_ratio": ppl / dense,
                     "active_ffn_share": layer.flops_per_token(layer.top_k) / layer.dense_flops_per_token(),
                     "seconds": time.time() - start})
        print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"dense_ppl": dense, "tokens": int(heldout[:, 1:].numel()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
