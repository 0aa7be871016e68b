"""Sparse Expansion vs one-shot pruning at equal FFN sparsity (issue #5, part 3), dense alongside.

Each row loads the dense model afresh, prunes every FFN (all three matrices) sequentially on the
calibration text and scores held-out perplexity; the dense model is scored once on the same
tokens in the same run. Each row equals
`moefy prune smollm2-135m --method M --sparsity S --experts E --out DIR` (its command is stored
with it). Rows are appended to the JSON as they finish; rerunning skips rows already there.

    python benchmarks/prune_table.py --out benchmarks/results/prune_table.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.config import DataConfig
from moefy.eval.evaluate import perplexity
from moefy.io import write_json
from moefy.expansion.pruning import PruneConfig
from moefy.expansion.sparse_expansion import ExpansionConfig, ffn_flops, set_execution, sparsify

VARIANTS = ["magnitude:1", "wanda:1", "sparsegpt:1", "sparsegpt:4", "sparsegpt:16"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wiki-sample:calib")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--eval-data", default="wiki-sample:heldout")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--second-data", default="pydoc:heldout", help="second domain, scored for --second-at")
    p.add_argument("--second-tokens", type=int, default=8192)
    p.add_argument("--second-at", type=float, nargs="*", default=[0.5, 0.7])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--variant", nargs="+", default=VARIANTS, help="method:experts")
    p.add_argument("--pca-dim", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--markdown", action="store_true", help="print the table of --out as markdown and exit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"settings": vars(args), "rows": []}
    loaded = models.load(args.model)
    tok = loaded.tokenizer
    evals = {args.eval_data: data_mod.blocks(args.eval_data, tok, args.seq_len, max_tokens=args.eval_tokens),
             args.second_data: data_mod.blocks(args.second_data, tok, args.seq_len, max_tokens=args.second_tokens)}
    if "dense" not in result:
        result["dense"] = {name: perplexity(loaded.model, b)[0] for name, b in evals.items()}
        result["dense_tokens"] = {name: int(b[:, 1:].numel()) for name, b in evals.items()}
        write_json(out, result)
    print("dense", result["dense"], flush=True)
    data = DataConfig(source=args.calib, seq_len=args.seq_len, tokens=args.calib_tokens)
    for sparsity in args.sparsity:
        for variant in args.variant:
            method, experts = variant.split(":")
            key = f"{method}:{experts}:{sparsity}"
            if any(r["key"] == key for r in result["rows"]):
                continue
            result["rows"].append(run_row(args, key, method, int(experts), sparsity, data, evals))
            write_json(out, result)
            print(json.dumps({k: v for k, v in result["rows"][-1].items() if k != "layers"}), flush=True)


def run_row(args, key, method, experts, sparsity, data, evals) -> dict:
    t0 = time.perf_counter()
    loaded = models.load(args.model)
    m = sparsify(loaded.model, loaded.tokenizer, PruneConfig(method, sparsity),
                 ExpansionConfig(experts, pca_dim=args.pca_dim), data)
    build_s = time.perf_counter() - t0
    set_execution(m.model, "dense")  # same numbers as CSR up to summation order, faster here
    ppl = {name: perplexity(m.model, b)[0] for name, b in evals.items()
           if name == args.eval_data or sparsity in args.second_at}
    layers = m.record["layers"]
    return {"key": key, "method": method, "experts": experts, "sparsity": sparsity, "ppl": ppl,
            **ffn_flops(m.model), "build_s": round(build_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "loadavg": os.getloadavg(),
            "mean_ffn_relative_error": sum(l["ffn_relative_error"] for l in layers) / len(layers),
            "min_cluster_tokens": min(min(l["cluster_sizes"]) for l in layers),
            "command": f"moefy prune {args.model} --method {method} --sparsity {sparsity} --experts {experts} "
                       f"--pca-dim {args.pca_dim} --calib {args.calib} --calib-tokens {args.calib_tokens} "
                       f"--eval-data {args.eval_data} --eval-tokens {args.eval_tokens} --out runs/x",
            "layers": layers}


def markdown(result: dict) -> str:
    names = list(result["dense"])
    head = ["sparsity", "method", "experts", *[f"PPL {n}" for n in names], "FFN MFLOPs/token (router)",
            "FFN rel. error", "min tokens/cluster"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| 0 | dense | - | " + " | ".join(f"{result['dense'][n]:.2f}" for n in names) + " | - | - | - |"]
    order = {"magnitude": 0, "wanda": 1, "sparsegpt": 2}
    for r in sorted(result["rows"], key=lambda r: (r["sparsity"], order[r["method"]], r["experts"])):
        ppl = [f"{r['ppl'][n]:.2f}" if n in r["ppl"] else "-" for n in names]
        lines.append(f"| {r['sparsity']:.0%} | {r['method']} | {r['experts']} | " + " | ".join(ppl) +
                     f" | {r['ffn_flops_per_token'] / 1e6:.1f} ({r['router_flops_per_token'] / 1e6:.2f}) | "
                     f"{r['mean_ffn_relative_error']:.3f} | {r['min_cluster_tokens']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
