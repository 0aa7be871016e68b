"""Core experts (CoreInfer, Wang et al. 2024, in expert form): at prefill, each layer's experts
are ranked by how many of the prompt's tokens the router sent to them (ties by summed router
score), the top ones become the prompt's core experts, and the whole decode runs with them alone:
no router, one small dense FFN per layer (the shared neurons plus the core experts' neurons,
gathered into contiguous matrices once per prompt).

Budget: the core set costs the same FFN FLOPs per token as per-token routing, so it takes the
layer's top-k plus the experts the router's FLOPs would pay for ("flops"), or just top-k ("k").

# T tokens, D hidden, E routed experts, n neurons per expert, S shared neurons, K core experts
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch
import torch.nn.functional as F

from moefy.eval.bench import DenseFFNModule
from moefy.model import MoEModel, cache_kwarg, output_cache
from moefy.modeling.moe_layer import MoEFFN


class CoreFFN(DenseFFNModule):
    """One MoE layer restricted to fixed experts: a dense FFN of S + K*n neurons, exactly the
    MoEFFN with every token's mask set to `experts` (up to float rounding)."""

    def __init__(self, layer: MoEFFN, experts: torch.Tensor):
        super().__init__(layer, experts)
        self.experts = experts


def core_size(layer: MoEFFN, budget: str = "flops") -> int:
    """Core experts for a layer: its top-k ("k"), or as many as fit the FLOPs of routing per
    token, the router's included ("flops": top-k + router FLOPs / one expert's FLOPs)."""
    if budget == "k":
        return layer.top_k
    per_expert = layer.flops_per_token(1) - layer.flops_per_token(0)
    return min(layer.spec["num_experts"], layer.top_k + math.floor(layer.router.flops_per_token() / per_expert))


@contextlib.contextmanager
def selection_counts(m: MoEModel):
    """Per layer, how many tokens selected each expert [E] and their summed router scores [E],
    over every forward pass inside the block (the model routes per token as usual)."""
    counts = [torch.zeros(l.spec["num_experts"]) for l in m.layers]
    scores = [torch.zeros(l.spec["num_experts"]) for l in m.layers]

    def hook(i):
        def fn(layer, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            s = layer._scores(x)  # [T, E]
            counts[i] += layer.route(x).sum(0)
            scores[i] += s.sum(0)
        return fn

    hooks = [l.register_forward_pre_hook(hook(i)) for i, l in enumerate(m.layers)]
    try:
        yield counts, scores
    finally:
        for h in hooks:
            h.remove()


def choose(counts: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k experts selected most often; ties go to the larger summed score. Sorted ids [k]."""
    order = scores.argsort(descending=True, stable=True)
    order = order[counts[order].argsort(descending=True, stable=True)]
    return order[:k].sort().values


@contextlib.contextmanager
def fixed_experts(m: MoEModel, experts: list[torch.Tensor]):
    """Every MoE layer replaced by its CoreFFN for `experts` inside the block."""
    names = [name for name, mod in m.model.named_modules() if isinstance(mod, MoEFFN)]
    layers = m.layers
    for name, layer, e in zip(names, layers, experts):
        m.model.set_submodule(name, CoreFFN(layer, e))
    try:
        yield
    finally:
        for name, layer in zip(names, layers):
            m.model.set_submodule(name, layer)


@torch.no_grad()
def continuation_nll(m: MoEModel, block: torch.Tensor, prompt_len: int, mode: str,
                     budget: str = "flops", dense=None) -> tuple[float, int]:
    """Summed NLL of block[:, prompt_len:] given the prompt, and the token count. mode: "dense"
    (every expert, or the model `dense` when given: the source model of a model whose weights
    changed, see MoEModel.all_experts_is_dense), "routed" (per-token routing) or "core"
    (per-token routing over the prompt, then only the prompt's core experts)."""
    target = block[:, prompt_len:]
    with m.sparse_only():  # the prompt routed per token too, as the study compares
        if mode == "dense" and dense is not None:
            logits = dense(input_ids=block).logits[:, prompt_len - 1:-1]
        elif mode in ("dense", "routed"):
            with (m.all_experts() if mode == "dense" else contextlib.nullcontext()):
                logits = m.model(input_ids=block).logits[:, prompt_len - 1:-1]
        else:
            with selection_counts(m) as (counts, scores):
                out = m.model(input_ids=block[:, :prompt_len], use_cache=True)
            experts = [choose(c, s, core_size(l, budget)) for l, c, s in zip(m.layers, counts, scores)]
            with fixed_experts(m, experts):
                rest = m.model(input_ids=block[:, prompt_len:-1], **{cache_kwarg(m.model): output_cache(out)}).logits
            logits = torch.cat([out.logits[:, -1:], rest], 1)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
    return float(nll), target.numel()


def evaluate(m: MoEModel, blocks: torch.Tensor, prompt_len: int, budget: str = "flops") -> dict:
    """Continuation perplexity of dense, per-token-routed and core-expert decoding, each
    block [L] being prompt_len prompt tokens then the continuation."""
    out = {}
    source = None if m.all_experts_is_dense else m.source_model()
    for mode in ("dense", "routed", "core"):
        nll = count = 0
        for block in blocks:
            a, b = continuation_nll(m, block[None], prompt_len, mode, budget, dense=source)
            nll, count = nll + a, count + b
        out[mode] = math.exp(nll / count)
    core_k = [core_size(l, budget) for l in m.layers]
    return {"ppl": out, "tokens": count, "prompts": len(blocks), "prompt_len": prompt_len,
            "core_budget": budget, "core_k_mean": sum(core_k) / len(core_k),
            "top_k_mean": sum(l.top_k for l in m.layers) / len(m.layers)}


@torch.no_grad()
def decode_speed(m: MoEModel, prompt: torch.Tensor, new_tokens: int, rounds: int = 3,
                 budget: str = "flops") -> dict:
    """Greedy decode tokens/s after `prompt` [1, L]: per-token routing, core experts (chosen at
    prefill; the CoreFFNs' gathering counted separately as build_ms) and the dense model
    (bench.dense_twin), interleaved for `rounds` rounds; medians, and each mode's tokens."""
    from moefy.eval.bench import dense_twin
    from moefy.studies.offload import greedy

    dense = dense_twin(m)
    out = {mode: {"tok_s": [], "build_ms": []} for mode in ("routed", "core", "dense")}

    def core_run():
        with selection_counts(m) as (counts, scores):
            @contextlib.contextmanager
            def after_prefill():
                start = time.perf_counter()
                with fixed_experts(m, [choose(c, s, core_size(l, budget)) for l, c, s in zip(m.layers, counts, scores)]):
                    out["core"]["build_ms"].append(1e3 * (time.perf_counter() - start))
                    yield
            return greedy(m.model, prompt, new_tokens, after_prefill)

    runs = {"routed": lambda: greedy(m.model, prompt, new_tokens), "core": core_run,
            "dense": lambda: greedy(dense, prompt, new_tokens)}
    for _ in range(rounds):
        for mode, fn in runs.items():
            tokens, times = fn()
            out[mode]["tok_s"].append(len(times) / sum(times))
            out[mode]["tokens"] = tokens
    for mode in out:
        out[mode]["tok_s_rounds"] = out[mode]["tok_s"]
        out[mode]["tok_s"] = statistics.median(out[mode]["tok_s"])
        out[mode]["build_ms"] = statistics.median(out[mode]["build_ms"]) if out[mode]["build_ms"] else 0.0
    return out
