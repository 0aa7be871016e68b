"""Does the MLP router gain from more calibration tokens? Router recall on held-out text.

Layers 2, 15 and 27 of SmolLM2-135M, the default split (384 slots of 4 neurons, 10% shared,
co-activation on the first 16384 calibration tokens), 50% and 25% active FFN. The router is
trained on the first N calibration tokens (N in --tokens, steps scaled so every run sees each
token the same number of times) and scored on wiki-sample:heldout layer inputs: recall = share of
the oracle's experts (largest true output norms) that the router picks.

    python benchmarks/router_data.py --tokens 16384 65536 --out benchmarks/results/router_data.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moefy.pipeline import data, load as models
from moefy.arch import family_for
from moefy.config import MoEConfig
from moefy.pipeline.group import split_neurons
from moefy.modeling.moe_layer import MoEFFN
from moefy.pipeline.stats import FFNStats
from moefy.pipeline.calibrate import capture
from moefy.pipeline.route import recall, router_spec, train_mlp_router

LAYERS = (2, 15, 27)


@torch.no_grad()
def layer_inputs(model, family, blocks, layers, coactivation: bool):
    stats = [FFNStats(f"layer {i}", 0.25, coactivation and i in layers, len(blocks.flatten()) if i in layers else 0)
             for i in range(len(family.block_list(model)))]
    with capture(model, family, stats):
        for b in blocks.split(8):
            model(input_ids=b)
    return stats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--out")
    args = p.parse_args()
    loaded = models.load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    family = family_for(model.config)
    calib = data.blocks("wiki-sample:calib", tok, 256, max_tokens=max(args.tokens))
    held = data.blocks("wiki-sample:heldout", tok, 256, max_tokens=8192)
    t0 = time.time()
    train_stats = layer_inputs(model, family, calib, LAYERS, coactivation=False)
    split_stats = layer_inputs(model, family, calib[: 16384 // 256], LAYERS, coactivation=True)
    held_stats = layer_inputs(model, family, held, LAYERS, coactivation=False)
    print(f"profiled in {time.time() - t0:.0f}s", flush=True)
    cfg = MoEConfig()
    rows = []
    for i in LAYERS:
        ffn = family.dense_ffn(family.block_list(model)[i], model.config)
        split = split_neurons("coactivation", ffn, split_stats[i], cfg.num_experts, cfg.shared, i)
        for share in args.shares:
            for n in args.tokens:
                torch.manual_seed(0)
                moe = MoEFFN.from_dense(ffn, split.shared, split.experts, router_spec("mlp", cfg))
                moe.set_selection(moe.top_k_for_share(share), None)
                steps = round(cfg.router_steps * n / 16384)
                start = time.time()
                m = train_mlp_router(moe, train_stats[i].inputs[:n], loss=cfg.router_loss, steps=steps,
                                     lr=cfg.router_lr, seed=0)
                row = {"layer": i, "share": share, "tokens": n, "steps": steps, "top_k": moe.top_k,
                       "val_recall": m["router_recall"], "heldout_recall": recall(moe, held_stats[i].inputs),
                       "seconds": round(time.time() - start, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "command": "python benchmarks/router_data.py " + " ".join(
                ["--tokens", *map(str, args.tokens), "--shares", *map(str, args.shares)])}, f, indent=1)


if __name__ == "__main__":
    main()
