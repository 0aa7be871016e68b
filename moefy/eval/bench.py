"""Wall-clock speed of an MoE model against its dense self, side by side in one process.

Protocol (../shared/PERF.md): dense and MoE share the same weights and are both built before
timing; the thread count is set explicitly; warm-up calls, then interleaved rounds (dense, MoE,
dense, MoE, ...) of timed calls; we report median and p10/p90 per side and the median of the
per-round ratios; parity (all experts active == dense) is checked before any timing. FFN
benchmarks run a stack of every layer (distinct weights, so the working set exceeds the cache)
on real FFN inputs captured from held-out text.

# T tokens, D hidden, I ffn width, L layers
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moefy.model import MoEModel
from moefy.errors import MoefyError
from moefy.eval.evaluate import EXECUTED_KEYS, compute
from moefy.eval.step import lean_generate, step_breakdown, supports_static_cache
from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN


class DenseFFNModule(nn.Module):
    """The dense FFN rebuilt from an MoEFFN's weights, laid out like the original model's FFN
    (nn.Linear-style [out, in] weights): the honest baseline for timing. With `experts` [K], only
    the shared neurons and those experts' neurons (core.CoreFFN)."""

    def __init__(self, moe: MoEFFN, experts: torch.Tensor | None = None):
        super().__init__()
        pick = (lambda w: w) if experts is None else (lambda w: w[experts])  # noqa: E731
        flat = lambda shared, routed: None if routed is None else torch.cat(  # noqa: E731
            ([shared] if shared is not None else []) + [pick(routed).flatten(0, 1)]).contiguous()
        self.act = ACTIVATIONS[moe.act]
        self.w_in = nn.Parameter(flat(moe.shared_in, moe.w_in), requires_grad=False)  # [I, D]
        self.w_up = None if moe.w_up is None else nn.Parameter(flat(moe.shared_up, moe.w_up), requires_grad=False)
        self.b_in = None if moe.b_in is None else nn.Parameter(flat(moe.shared_b_in, moe.b_in), requires_grad=False)
        self.w_out = nn.Parameter(flat(moe.shared_out, moe.w_out).T.contiguous(), requires_grad=False)  # [D, I]
        self.b_out = moe.b_out

    def forward(self, x):
        h = self.act(F.linear(x, self.w_in, self.b_in))
        if self.w_up is not None:
            h = h * F.linear(x, self.w_up)
        return F.linear(h, self.w_out, self.b_out)


def dense_twin(m: MoEModel) -> nn.Module:
    """A copy of the model with every MoEFFN replaced by its DenseFFNModule."""
    model = copy.deepcopy(m.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MoEFFN):
            model.set_submodule(name, DenseFFNModule(module))
    return model


@dataclass
class Timing:
    dense: list[float]
    moe: list[float]
    ratios: list[float]

    def summary(self, unit: str = "ms") -> dict:
        scale = 1e3 if unit == "ms" else 1.0
        out = {}
        for side, xs in (("dense", self.dense), ("moe", self.moe)):
            q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
            out[f"{side}_{unit}"] = statistics.median(xs) * scale
            out[f"{side}_p10_{unit}"], out[f"{side}_p90_{unit}"] = q[0] * scale, q[-1] * scale
        out["ratio"] = statistics.median(self.ratios)
        return out


def compare(dense_fn, moe_fn, *, warmup: int, iters: int, rounds: int) -> Timing:
    """Interleaved rounds of `iters` timed calls each; ratio = MoE / dense median per round."""
    for _ in range(warmup):
        dense_fn()
        moe_fn()
    t = Timing([], [], [])
    for _ in range(rounds):
        d, m = _time(dense_fn, iters), _time(moe_fn, iters)
        t.dense += d
        t.moe += m
        t.ratios.append(statistics.median(m) / statistics.median(d))
    return t


def _time(fn, iters):
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def check_parity(m: MoEModel, dense: list[nn.Module], inputs: list[torch.Tensor], atol: float = 1e-4):
    with m.all_experts():
        for i, (layer, d, x) in enumerate(zip(m.layers, dense, inputs)):
            err = float((layer(x[:64]) - d(x[:64])).abs().max())
            if err > atol * max(1.0, float(d(x[:64]).abs().max())):
                raise MoefyError(f"parity check failed in layer {i}: all-experts MoE differs from dense by {err:.2e}")


FFN_SLICES = 16  # distinct inputs the FFN benchmarks cycle through, call after call


@torch.no_grad()
def bench_ffn(m: MoEModel, inputs, tokens: int, layers: int | None, **timing) -> dict:
    """A stack of FFN layers (each on its own input) timed dense vs MoE; also the router alone.
    Successive calls take successive slices of `tokens` tokens (up to FFN_SLICES spread over the
    inputs, cycling), the same on both sides: a router whose count varies by token (score thresholds) is timed on a
    spread of tokens, not on one."""
    moe = m.layers[:layers] if layers else m.layers
    dense = [DenseFFNModule(layer) for layer in moe]
    inputs = inputs[:len(moe)]
    n = min(len(x) for x in inputs)
    slices = max(1, min(FFN_SLICES, n // tokens))
    stride = n // slices  # slices spread over the captured text, each centred in its stretch
    starts = [j * stride + (stride - tokens) // 2 for j in range(slices)]
    stacks = [[x[a:a + tokens] for x in inputs] for a in starts]
    check_parity(m, dense, stacks[0])
    for layer in moe:
        layer.reset_counters()

    def cycle(run):
        calls = itertools.count()
        return lambda: run(stacks[next(calls) % slices])

    t = compare(cycle(lambda xs: [d(x) for d, x in zip(dense, xs)]), cycle(lambda xs: [l(x) for l, x in zip(moe, xs)]),
                **timing)
    router = compare(lambda: None, cycle(lambda xs: [l.routing_step(x) for l, x in zip(moe, xs)]), **timing)
    out = t.summary()
    out.update(tokens=tokens, slices=slices, layers=len(moe), router_ms=router.summary()["moe_ms"],
               mean_k=sum(l.mean_k() for l in moe) / len(moe),
               mean_sketched=sum(l.mean_sketched() for l in moe) / len(moe))
    return out


@torch.no_grad()
def bench_model(m: MoEModel, dense_model, prompt: torch.Tensor, output_len: int, warmup: int, iters: int,
                lean: bool = False) -> dict:
    """Greedy generation with the KV cache under plain HF `generate`, and prefill latency. The
    decode speedup is per new token, the prompt excluded: each round's generate time less the
    median prefill time of its side, dense over MoE (the median of the rounds' ratios). With
    `lean`, the same again with a static KV cache for both models (step.lean_generate) as
    "decode_lean", where the family supports one."""
    def generate(model):
        return lambda: model.generate(prompt, max_new_tokens=output_len, min_new_tokens=output_len,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    w = dict(warmup=warmup, rounds=iters, iters=1)
    gen = compare(generate(dense_model), generate(m.model), **w)
    pre = bench_prefill(m, dense_model, prompt, warmup=max(1, warmup), rounds=iters)
    result = {"decode": _decode_summary(gen, pre, prompt, output_len), "prefill": _prefill_summary(pre, prompt)}
    if lean and supports_static_cache(m.model):
        static = lambda model: lambda: lean_generate(model, prompt, output_len)  # noqa: E731
        result["decode_lean"] = {**_decode_summary(compare(static(dense_model), static(m.model), **w), pre, prompt,
                                                   output_len), "cache": "static"}
    return result


def _decode_summary(gen: "Timing", pre: "Timing", prompt: torch.Tensor, output_len: int) -> dict:
    new = output_len * prompt.shape[0]
    p_dense, p_moe = statistics.median(pre.dense), statistics.median(pre.moe)
    dense_step = [max(g - p_dense, 1e-9) / new for g in gen.dense]
    moe_step = [max(g - p_moe, 1e-9) / new for g in gen.moe]
    decode = {"dense_tok_s": statistics.median(1 / t for t in dense_step),
              "moe_tok_s": statistics.median(1 / t for t in moe_step),
              "dense_ms_per_token": statistics.median(dense_step) * 1e3,
              "moe_ms_per_token": statistics.median(moe_step) * 1e3,
              "speedup": statistics.median(d / m_ for d, m_ in zip(dense_step, moe_step)),
              "speedup_with_prompt": statistics.median(d / m_ for d, m_ in zip(gen.dense, gen.moe)),
              "input_len": prompt.shape[1], "output_len": output_len, "batch_size": prompt.shape[0]}
    return decode


def bench_prefill(m: MoEModel, dense_model, prompt: torch.Tensor, warmup: int, rounds: int) -> Timing:
    """One forward pass over the prompt (no cache), dense vs MoE."""
    def prefill(model):
        return lambda: model(input_ids=prompt, use_cache=False)

    return compare(prefill(dense_model), prefill(m.model), warmup=warmup, rounds=rounds, iters=1)


def _prefill_summary(t: Timing, prompt: torch.Tensor) -> dict:
    return {**t.summary(), "tokens": prompt.numel()}  # ratio: MoE / dense, the median of the rounds


def environment(threads: int) -> dict:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = " ".join(f for f in line.split(":")[1].split() if f.startswith(("avx", "fma", "amx")))
                    break
    return {"threads": threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_flags": flags, "load_avg_1m": os.getloadavg()[0], "cores": os.cpu_count()}


def run(m: MoEModel, blocks: torch.Tensor, *, input_len: int, output_len: int, batch_size: int, warmup: int,
        iters: int, rounds: int, threads: int, prefill_tokens: int, prefill_layers: int,
        long_prompt: int = 1024, lean: bool = False) -> dict:
    """The whole benchmark: FFN stacks at batch 1 and prefill size, model decode and prefill (at
    the prompt length and at `long_prompt` tokens), where a decode step's time goes (step), memory,
    and the cost the decode path executes; with `lean`, decode with a static KV cache too."""
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    with m.all_experts():
        inputs = m.layer_inputs(blocks)
    timing = dict(warmup=warmup, iters=iters, rounds=rounds)
    result = environment(threads)
    result["ffn_batch1"] = bench_ffn(m, inputs, 1, None, **timing)
    result["ffn_prefill"] = bench_ffn(m, inputs, prefill_tokens, prefill_layers, **{**timing, "iters": max(3, iters // 4)})
    prompt = blocks[:1, :input_len].repeat(batch_size, 1)
    dense_model = dense_twin(m)
    for layer in m.layers:
        layer.reset_counters()
    result.update(bench_model(m, dense_model, prompt, output_len, warmup=1, iters=rounds, lean=lean))
    cost = compute(m)  # measured over the generation runs
    if m.model.can_generate():
        result["step"] = {"dense": step_breakdown(dense_model, prompt[:1]), "moe": step_breakdown(m.model, prompt[:1])}
    result["active_ffn_share"] = cost["active_ffn_share"]  # the counted FLOP share of earlier versions
    result["executed"] = {k: cost[k] for k in EXECUTED_KEYS}
    long = blocks.flatten()[:long_prompt][None]
    if long.shape[1] == long_prompt:
        result["prefill_long"] = _prefill_summary(bench_prefill(m, dense_model, long, warmup=1, rounds=rounds), long)
    result["weights_mb"] = {"dense": _mb(dense_model), "moe": _mb(m.model)}
    result["memory"] = {"dense_mb": resident_mb(dense_model), "moe_mb": resident_mb(m.model)}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The 1-minute load average counts this benchmark's own threads; more than that means another
    # process competed for the cores (it lags, so look before and after).
    result["load_avg_1m"] = max(load_before, os.getloadavg()[0])
    if result["load_avg_1m"] > threads + 0.5:
        result["warning"] = "another process was busy during the run; ratios may be noisy"
    return result


def resident_mb(model) -> float:
    """What a model holds for inference: its parameters and buffers, and the tensors MoE layers
    derive from them and keep (a sketch router's transposed weights, Gram matrices, masks)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        for _key, derived in module.__dict__.get("_derived", {}).values():
            tensors.extend(t for t in _flatten(derived) if isinstance(t, torch.Tensor))
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    else:
        yield obj


def _mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
