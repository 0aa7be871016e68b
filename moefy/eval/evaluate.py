"""Quality and compute of an MoE model against its dense self, on the same tokens in one run.

The dense reference is the same MoE model with every expert active, which computes exactly the
dense FFN (tested), so no second copy of the dense model is needed."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moefy.model import MoEModel
from moefy.pipeline import data as data_mod


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False,
               desc: str = "perplexity") -> tuple[float, int]:
    """Causal-LM perplexity over [B, L] blocks (each block scored on its own); (ppl, tokens)."""
    nll, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc=desc, disable=None if progress else True):
        logits = model(input_ids=batch.to(model.device)).logits[:, :-1]
        target = batch[:, 1:].to(logits.device)
        nll += float(F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count), count


@torch.no_grad()
def hidden_states(model, blocks, batch_size=8):
    return torch.cat([model(input_ids=b.to(model.device)).last_hidden_state.flatten(0, 1).float()
                      for b in blocks.split(batch_size)])


def compute(m: MoEModel) -> dict:
    """The cost per token from the counts of the last MoE-mode run: what the decode path executes
    (weight bytes read and FLOPs, router included: MoEFFN.decode_cost), and the counted FLOP share
    of earlier versions (active_ffn_share: it counts savings no path executes, e.g. a pruned
    sketch's reuse, and the sketch's FLOPs net of its pruned zeros)."""
    return {**_counted(m), **executed(m)}


EXECUTED_KEYS = ("decode_bytes_per_token", "decode_flops_per_token", "router_bytes_per_token", "dense_bytes_per_token",
                 "executed_bytes_share", "executed_flops_share", "router_bytes_share")


def executed(m: MoEModel) -> dict:
    """Per token at decode, summed over the layers: FFN weight bytes read and FLOPs executed, router
    included, against the dense FFN's, and the router's share of the dense bytes."""
    costs = [layer.decode_cost() for layer in m.layers]
    total = {key: sum(c[key] for c in costs) for key in costs[0]}
    return {"decode_bytes_per_token": total["bytes"], "decode_flops_per_token": total["flops"],
            "router_bytes_per_token": total["router_bytes"], "dense_bytes_per_token": total["dense_bytes"],
            "executed_bytes_share": total["bytes"] / total["dense_bytes"],
            "executed_flops_share": total["flops"] / total["dense_flops"],
            "router_bytes_share": total["router_bytes"] / total["dense_bytes"]}


def _counted(m: MoEModel) -> dict:
    dense = sum(layer.dense_flops_per_token() for layer in m.layers)
    moe = sum(layer.flops_per_token(layer.mean_k(), layer.mean_sketched()) for layer in m.layers)
    neurons = sum(layer.spec["shared"] + layer.mean_k() * layer.spec["expert_size"] for layer in m.layers)
    width = sum(layer.spec["shared"] + layer.spec["num_experts"] * layer.spec["expert_size"] for layer in m.layers)
    mean_k = sum(layer.mean_k() for layer in m.layers) / len(m.layers)
    return {"dense_ffn_flops_per_token": dense, "moe_ffn_flops_per_token": moe,
            "active_ffn_share": moe / dense, "active_neuron_share": neurons / width, "mean_k": mean_k,
            "mean_sketched": sum(layer.mean_sketched() for layer in m.layers) / len(m.layers)}


def dense_reference(m: MoEModel, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False):
    """The dense model's result on `blocks`: (perplexity, tokens) for causal LMs, the final hidden
    states for encoders. Pass it to evaluate() to score several MoE settings of the same base
    model against one dense run. Every expert active is the dense model, except after recovery
    tuning or the down refit changed the weights: then the source model is loaded and run."""
    exact = m.all_experts_is_dense
    model = m.model if exact else m.source_model()
    with m.all_experts() if exact else contextlib.nullcontext():
        return (perplexity(model, blocks, batch_size, progress, "dense") if m.family.causal
                else hidden_states(model, blocks, batch_size))


def evaluate(m: MoEModel, blocks: torch.Tensor | str, batch_size: int = 8, progress: bool = False,
             oracle: bool = False, reference=None) -> dict:
    """Dense vs MoE on the same blocks: perplexity (causal LMs) or agreement of the final hidden
    states (encoders), and FFN FLOPs per token with the router counted. With `oracle`, also the
    same experts and k under perfect routing, and the router's recall of the oracle's choice.
    `blocks`: token blocks [B, L], or a text spec (data.py; 8,192 tokens in blocks of 256, as
    `moefy eval`). `reference`: dense_reference() of the same base model on the same blocks, to
    skip the dense run."""
    if isinstance(blocks, str):
        blocks = data_mod.blocks(blocks, m.tokenizer, 256, max_tokens=8192)
    for layer in m.layers:
        layer.reset_counters()
    causal = m.family.causal
    dense = reference if reference is not None else dense_reference(m, blocks, batch_size, progress)
    with m.sparse_only():  # every scored token as decode computes it, prompt path or not
        moe = (perplexity(m.model, blocks, batch_size, progress, "moe") if causal
               else hidden_states(m.model, blocks, batch_size))
    c = compute(m)
    out = {"dense": {"ffn_flops_per_token": c["dense_ffn_flops_per_token"]},
           "moe": {"ffn_flops_per_token": c["moe_ffn_flops_per_token"], "active_ffn_share": c["active_ffn_share"],
                   "active_neuron_share": c["active_neuron_share"], "mean_k": c["mean_k"],
                   "mean_sketched": c["mean_sketched"],
                   "executed": {k: c[k] for k in EXECUTED_KEYS}},
           "tokens": int(blocks.numel())}
    start = m.layers[0].spec.get("dense_prompt_from")
    if start is not None:
        out["scoring"] = (f"every token scored through the sparse per-token path, as decode runs; at inference "
                          f"calls of {start}+ tokens (prompts) take the dense FFN, which changes their speed only")
    if causal:
        out["dense"]["ppl"], out["moe"]["ppl"] = dense[0], moe[0]
        out["ppl_ratio"] = moe[0] / dense[0]
        out["tokens"] = dense[1]
    else:
        out["moe"]["cosine_to_dense"] = float(F.cosine_similarity(dense, moe, dim=-1).mean())
    if oracle and causal:
        with m.oracle():
            ppl, _ = perplexity(m.model, blocks, batch_size, progress, "oracle")
        out["oracle"] = {"ppl": ppl, "ppl_ratio": ppl / dense[0], "router_recall": router_recall(m, blocks[:1])}
    return out


@torch.no_grad()
def router_recall(m: MoEModel, blocks: torch.Tensor) -> float:
    """Mean over layers of the share of the oracle's experts that the router selects, on the
    layer inputs the MoE model itself produces."""
    from moefy.pipeline.route import recall

    inputs = m.layer_inputs(blocks)
    return sum(recall(l, x) for l, x in zip(m.layers, inputs)) / len(inputs)
