"""Where one dense GEMM beats the sparse paths: the FFN stack (all layers) of a converted model at
T tokens per call, sparse vs dense, side by side (moefy.eval.bench protocol). The smallest T from
which dense is faster is the dense prompt path's start (moefy.modeling.compiled.DENSE_PROMPT_FROM).

    python benchmarks/prefill_crossover.py runs/smol-moe --threads 1 --json benchmarks/results/crossover.json
"""

import argparse
import json

import torch

import moefy
from moefy.eval.bench import bench_ffn, environment
from moefy.pipeline import data as data_mod

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--json")
args = parser.parse_args()

torch.set_num_threads(args.threads)
m = moefy.load(args.run)
m.set_dense_prompt_from(None)  # time the sparse paths at every size
blocks = data_mod.blocks("wiki-sample:heldout", m.tokenizer, 256, max_tokens=2048)
with m.all_experts():
    inputs = m.layer_inputs(blocks)
rows = []
for t in args.tokens:
    r = bench_ffn(m, inputs, t, None, warmup=3, iters=max(3, 64 // t), rounds=args.rounds)
    rows.append({"tokens": t, "dense_ms": r["dense_ms"], "moe_ms": r["moe_ms"], "ratio": r["ratio"]})
    print(json.dumps(rows[-1]), flush=True)
out = {"env": environment(args.threads), "run": args.run, "rows": rows,
       "dense_from": next((r["tokens"] for r in rows if r["ratio"] >= 1.0), None)}
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
print(json.dumps({"dense_from": out["dense_from"]}))
