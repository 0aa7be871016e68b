"""Check that a saved moefy folder reloads exactly, both ways: `moefy.load` and plain transformers
(`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, the folder's own modeling
code, no moefy import needed), on real held-out text. Used for BENCHMARKS.md's real-model rows:

    python benchmarks/reload_check.py runs/qwen-balanced --tokens 64

Prints the largest logit difference between the two loads (sparse decode path, one token per
call, so the routers and kernels run as at inference) and exits 1 if they differ by more than
--atol.
"""

from __future__ import annotations

import argparse
import sys

import torch

import moefy
from moefy.model import cache_kwarg, output_cache
from moefy.pipeline.data import blocks


def greedy_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position, computed one token per call with the KV cache (decode)."""
    out, name = model(input_ids=ids[:, :1], use_cache=True), cache_kwarg(model)
    logits = [out.logits[:, -1]]
    for t in range(1, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: output_cache(out)})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--atol", type=float, default=1e-3)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    m = moefy.load(a.folder)
    ids = blocks("wiki-sample:heldout", m.tokenizer, a.tokens, max_tokens=a.tokens)[:1]
    with torch.inference_mode():
        ours = greedy_logits(m.model, ids)
        del m
        plain = AutoModelForCausalLM.from_pretrained(a.folder, trust_remote_code=True, dtype=torch.float32)
        theirs = greedy_logits(plain, ids)
    diff = float((ours - theirs).abs().max())
    same = bool(torch.equal(ours.argmax(-1), theirs.argmax(-1)))
    print(f"{a.folder}: max |logit difference| {diff:.2e} over {ids.shape[1]} decode steps; "
          f"same greedy tokens: {same}")
    return 0 if diff <= a.atol and same else 1


if __name__ == "__main__":
    sys.exit(main())
