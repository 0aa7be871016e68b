"""Where a decode step's time goes, and a leaner step for both models (issue 35, part 4).

`step_breakdown` times single-token forward passes with the KV cache (what `generate` runs per new
token) and, through forward hooks, the time spent inside the attention modules, the FFNs and the
output head; the rest is embeddings, norms, residual adds, the cache and Python between modules.
The hooks cost a little themselves, so the parts' shares are what to read, not their sum.

`lean_generate` is the same greedy `generate` with a static KV cache (preallocated to the
prompt plus the new tokens, no concatenation per step), where the model's family supports it.
"""

from __future__ import annotations

import time

import torch

from moefy.model import cache_kwarg, output_cache
from moefy.modeling.moe_layer import MoEFFN

PARTS = ("attention", "ffn", "head")


def _parts(model) -> dict[str, list[torch.nn.Module]]:
    """The modules each part's time is taken from: attention blocks by name (self_attn, attn,
    attention; the outermost match in each block), the FFNs (MoEFFN, or the module the dense
    twin put in its place: every module named mlp / ffn / feed_forward), the output head."""
    found = {p: [] for p in PARTS}
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, MoEFFN) or leaf in ("mlp", "ffn", "feed_forward"):
            found["ffn"].append(module)
            taken.append(name)
        elif leaf in ("self_attn", "attn", "attention"):
            found["attention"].append(module)
            taken.append(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        found["head"].append(head)
    return found


@torch.no_grad()
def step_breakdown(model, prompt: torch.Tensor, steps: int = 16) -> dict:
    """Milliseconds per decode step (one new token per call, KV cache on) in total and in each
    part (attention, ffn, head, rest), the median over `steps` steps after a prompt."""
    clock: dict[str, float] = {p: 0.0 for p in PARTS}
    starts: dict[int, float] = {}
    hooks = []
    for part, modules in _parts(model).items():
        for module in modules:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, _args: starts.__setitem__(id(mod), time.perf_counter())))
            hooks.append(module.register_forward_hook(
                lambda mod, _a, _o, part=part: clock.__setitem__(
                    part, clock[part] + time.perf_counter() - starts.pop(id(mod)))))
    try:
        out = model(input_ids=prompt, use_cache=True)
        name, per_step = cache_kwarg(model), []
        for _ in range(steps + 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            before = dict(clock)
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{name: output_cache(out)})
            total = time.perf_counter() - start
            per_step.append({"total": total, **{p: clock[p] - before[p] for p in PARTS}})
    finally:
        for h in hooks:
            h.remove()
    per_step = sorted(per_step[1:], key=lambda s: s["total"])  # the first step warms up
    mid = per_step[len(per_step) // 2]
    result = {k: v * 1e3 for k, v in mid.items()}
    result["rest"] = result["total"] - sum(result[p] for p in PARTS)
    return {"ms": result, "share": {k: v / result["total"] for k, v in result.items() if k != "total"}}


def supports_static_cache(model) -> bool:
    """Whether `generate` can run this model with a static KV cache (decoder models whose
    transformers class says so)."""
    return bool(getattr(model, "_supports_static_cache", False) or getattr(model, "_can_compile_fullgraph", False))


def lean_generate(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy generation of exactly `new_tokens` with a static KV cache (see the module docstring)."""
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          use_cache=True, pad_token_id=0, cache_implementation="static")
