"""One process vs `torchrun --nproc-per-node N`: wall-clock of `moefy convert` and whether the saved
models are identical (assignment, router metrics, every tensor bit for bit).

    python benchmarks/distributed_check.py --out benchmarks/results/distributed_smol.json -- \\
        --model smollm2-135m --calib-tokens 4096 --experts 96 --no-eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> dict:
    ra, rb = (json.loads((p / "moefy.json").read_text()) for p in (a, b))
    wa, wb = (load_file(p / "model.safetensors") for p in (a, b))
    differ = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    return {"assignment_identical": ra["assignment"] == rb["assignment"],
            "router_metrics_identical": ra["layers"] == rb["layers"],
            "tensors": len(wa), "tensors_differing": differ}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process (torchrun's default is 1)")
    ap.add_argument("convert_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    extra = [a for a in args.convert_args if a != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        t_one = run([sys.executable, "-m", "moefy", "convert", *extra, "--out", str(one)], env)
        t_many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                      str(args.nproc), "-m", "moefy", "convert", *extra, "--out", str(many)], env)
        result = {"convert_args": extra, "nproc": args.nproc, "threads_per_process": args.threads,
                  "seconds_one_process": round(t_one, 1), f"seconds_{args.nproc}_processes": round(t_many, 1),
                  "load_average": os.getloadavg(), **compare(one, many)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
