"""CPU time of the sparse experts (torch sparse CSR) against the dense FFN (issue #5, part 4).

One SmolLM2 FFN (layer --layer), pruned with SparseGPT from its real inputs, as 1 expert (plain
pruning) and as --experts experts (Sparse Expansion, tokens routed by nearest centroid), timed on
real FFN inputs: a 1-token call (decode) and a --tokens call (prefill). Dense and sparse calls are
interleaved in rounds; each round's time is the median of --iters calls, the reported time the
median over rounds. 1 thread. The machine is shared: os.getloadavg() is recorded before and after.

    python benchmarks/sparse_timing.py --out benchmarks/results/sparse_timing.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.analysis.wasserstein import ffn_inputs
from moefy.arch import family_for
from moefy.io import write_json
from moefy.expansion.pruning import PruneConfig
from moefy.expansion.sparse_expansion import ExpansionConfig, expand_ffn


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--calib", default="wiki-sample:calib")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the prefill call")
    p.add_argument("--settings", nargs="+", default=["0.5", "0.7", "0.9", "2:4"])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)

    loaded = models.load(args.model)
    family = family_for(loaded.model.config)
    calib = data_mod.blocks(args.calib, loaded.tokenizer, 256, max_tokens=args.calib_tokens)
    x = ffn_inputs(loaded.model, family, calib)[args.layer]  # [N, D]
    block = family.block_list(loaded.model)[args.layer]
    dense_module = block.get_submodule(family.ffn)
    ffn = family.dense_ffn(block, loaded.model.config)
    held = data_mod.blocks("wiki-sample:heldout", loaded.tokenizer, 256, max_tokens=args.tokens)
    xh = ffn_inputs(loaded.model, family, held)[args.layer]  # held-out FFN inputs of the layer
    inputs = {"decode_1": xh[:1], f"prefill_{args.tokens}": xh[: args.tokens]}

    variants = {"dense": dense_module}
    for s in args.settings:
        cfg = PruneConfig("sparsegpt", nm=tuple(map(int, s.split(":")))) if ":" in s else PruneConfig("sparsegpt", float(s))
        for e in (1, args.experts):
            if e > 1 and ":" in s:
                continue
            variants[f"{s} x{e}"] = expand_ffn(ffn, x, cfg, ExpansionConfig(e), seed=0)[0]
    load_before = os.getloadavg()
    result = {"settings": vars(args), "loadavg_before": load_before, "calls": {}}
    for call, inp in inputs.items():
        times = {name: [] for name in variants}
        with torch.no_grad():
            for name, mod in variants.items():  # warm-up
                mod(inp)
            for _ in range(args.rounds):
                for name, mod in variants.items():
                    times[name].append(median_call(mod, inp, args.iters))
        dense = statistics.median(times["dense"])
        result["calls"][call] = {name: {"ms": statistics.median(t) * 1e3, "rounds_ms": [v * 1e3 for v in t],
                                        "vs_dense": statistics.median(t) / dense} for name, t in times.items()}
        for name, row in result["calls"][call].items():
            print(f"{call:>14} {name:>10}: {row['ms']:8.3f} ms  ({row['vs_dense']:.2f}x dense)", flush=True)
    result["loadavg_after"] = os.getloadavg()
    result["nnz_share"] = {name: (sum(m.spec["nnz"].values()) / (3 * ffn.width * ffn.hidden)) for name, m in
                           variants.items() if name != "dense"}
    write_json(args.out, result)


def median_call(module, x, iters) -> float:
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        module(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


if __name__ == "__main__":
    main()
