"""FFN-stack time of the compiled kernels (moefy.kernels) vs the torch paths, by tokens per call.

Shows where each path wins (MoEFFN takes the kernels whenever they are available). Each row is one bench_ffn
run (dense and MoE interleaved in one process, router included, 1 thread):

    python benchmarks/kernel_paths.py runs/smol-384 --active 0.5 0.25 --tokens 1 8 64 256 2048 --out F.json

For a sketch-router model, `gemm` times the torch paths' GEMMs (MoEFFN._masked: every routed
neuron computed, the selection masked) at every size, and `kernels` / `torch` never take them
(the model takes them on the torch paths only, from paths.SKETCH_GEMM_MIN_TOKENS tokens):

    python benchmarks/kernel_paths.py runs/smol-sketch-thr --active 0.5 --paths kernels gemm \
        --tokens 16 32 64 128 256 2048 --out benchmarks/results/sketch_prefill.json
"""
import argparse
import json

import torch

import moefy
from moefy.modeling import compiled, paths
from moefy.eval.bench import bench_ffn, environment

p = argparse.ArgumentParser()
p.add_argument("run")
p.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25])
p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 2048])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--paths", nargs="+", default=["kernels", "torch"], choices=["kernels", "torch", "gemm"])
p.add_argument("--torch-max-tokens", type=int, default=64, help="skip the torch path above this (minutes per row)")
p.add_argument("--out")
args = p.parse_args()
torch.set_num_threads(args.threads)
m = moefy.load(args.run)
blocks = moefy.pipeline.data.blocks("wiki-sample:heldout", m.tokenizer, seq_len=256, max_tokens=2048)
with m.all_experts():
    inputs = m.layer_inputs(blocks)
kernels = compiled._kernels()
gemm_from = paths.SKETCH_GEMM_MIN_TOKENS
rows = []
for active in args.active:
    m.set_active(active)
    for tokens in args.tokens:
        layers = None if tokens <= 64 else 4  # big calls: 4 layers are already far above the cache
        iters = 20 if tokens <= 64 else 3
        for path in args.paths:
            if path == "torch" and tokens > args.torch_max_tokens:
                continue
            compiled._KERNELS = kernels if path == "kernels" else None
            paths.SKETCH_GEMM_MIN_TOKENS = 1 if path == "gemm" else 1 << 62
            r = bench_ffn(m, inputs, tokens, layers, warmup=3, iters=iters, rounds=3)
            row = dict(active=active, tokens=tokens, path=path, layers=r["layers"], dense_ms=r["dense_ms"],
                       moe_ms=r["moe_ms"], ratio=r["ratio"], router_ms=r["router_ms"], mean_k=r["mean_k"])
            rows.append(row)
            print(json.dumps(row), flush=True)
compiled._KERNELS = kernels
paths.SKETCH_GEMM_MIN_TOKENS = gemm_from
if args.out:
    moefy.io.write_json(args.out, {"run": args.run, "environment": environment(args.threads), "rows": rows})
