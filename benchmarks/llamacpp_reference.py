"""The outside reference a CPU user would pick instead of moefy: llama.cpp's dense decode of the
same GGUF file on the same machine (issue 35, part 6), with moefy's own dense and MoE decode
measured in the same run so the three numbers share one machine state.

    pip install --target /tmp/llama llama-cpp-python          # builds llama.cpp, about 5 minutes
    PYTHONPATH=/tmp/llama python benchmarks/llamacpp_reference.py --moe runs/balanced --threads 1 \
        --json benchmarks/results/llamacpp_reference.json

Protocol as `moefy bench`'s decode: a 128-token prompt of held-out Wikipedia text, 128 greedy new
tokens, time per new token with the prompt excluded (the time to the first new token is the
prompt's), median of `--rounds` rounds, llama.cpp and moefy interleaved. End of text is masked
so every run makes all its tokens. Not part of the tests or CI (llama-cpp-python is not a
dependency).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import moefy
from moefy.eval.bench import dense_twin
from moefy.pipeline.data import blocks
from moefy.pipeline.load import resolve


def llamacpp_decode(llm, prompt: list[int], new: int) -> tuple[float, float]:
    """(prompt seconds, seconds per new token) for greedy decoding of `new` tokens after `prompt`."""
    eos = llm.token_eos()
    mask = lambda ids, logits: (logits.__setitem__(eos, -float("inf")), logits)[1]  # noqa: E731
    llm.reset()
    start = time.perf_counter()
    first = None
    made = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True, logits_processor=[mask]):
        made += 1
        if first is None:
            first = time.perf_counter()
        if made == new + 1:
            break
    end = time.perf_counter()
    return first - start, (end - first) / new


def hf_decode(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """The same measure for a transformers model under plain `generate` (greedy, KV cache)."""
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        one = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False)
        whole = time.perf_counter() - start
    return one, (whole - one) / new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default="smollm2-135m", help="GGUF file llama.cpp runs (default: the built-in SmolLM2)")
    p.add_argument("--moe", type=Path, help="a moefy folder converted from that model, timed beside it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: llama-cpp-python is not installed (see this script's docstring)", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    gguf = str(resolve(a.gguf))
    llm = Llama(model_path=gguf, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.prompt + a.new + 8,
                verbose=False)
    text_ids = None
    sides = {"llama.cpp": lambda: llamacpp_decode(llm, prompt_ids, a.new)}
    if a.moe is not None:
        m = moefy.load(a.moe)
        text_ids = blocks("wiki-sample:heldout", m.tokenizer, a.prompt, max_tokens=a.prompt)[:1]
        dense = dense_twin(m)
        sides["moefy dense (HF fp32)"] = lambda: hf_decode(dense, text_ids, a.new)
        sides["moefy MoE (HF fp32)"] = lambda: hf_decode(m.model, text_ids, a.new)
    prompt_ids = (text_ids[0].tolist() if text_ids is not None else
                  llm.tokenize(" ".join(["The history of the city"] * 40).encode())[:a.prompt])
    for f in sides.values():  # warm-up
        f()
    results = {name: [] for name in sides}
    for _ in range(a.rounds):
        for name, f in sides.items():
            results[name].append(f())
    report = {"gguf": gguf, "threads": a.threads, "prompt": a.prompt, "new": a.new, "rounds": a.rounds,
              "cpu_flags": sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512f", "avx512_vnni"}),
              "sides": {name: {"prompt_ms": statistics.median(r[0] for r in rs) * 1e3,
                               "ms_per_token": statistics.median(r[1] for r in rs) * 1e3,
                               "tok_s": 1 / statistics.median(r[1] for r in rs)} for name, rs in results.items()}}
    for name, r in report["sides"].items():
        print(f"{name:24s} {r['tok_s']:7.1f} tok/s  ({r['ms_per_token']:.1f} ms per new token, prompt {r['prompt_ms']:.0f} ms)")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
