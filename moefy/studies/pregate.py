"""Pre-gating (Pre-gated MoE, Hwang et al. 2024): the router of layer l reads layer l-1's FFN
input instead of its own, so the experts a token needs in layer l are known one layer early and
can be loaded while layer l-1 computes (offload.py). The first layer keeps its own router.

A pre-gated router is trained exactly like the layer's own MLP router (routing.train_mlp_router:
same width, loss, steps and seed; targets = layer l's expert output norms on its own inputs) but
reads the previous layer's inputs for the same tokens. `moefy convert --router-input previous`
builds such a model directly; `pregate()` turns a converted model into one, and `analyse()`
measures what that costs against the per-layer routers.

# N tokens, D hidden, E routed experts, L layers
"""

from __future__ import annotations

import copy
import logging

import torch

from moefy.config import MoEConfig
from moefy.model import MoEModel
from moefy.eval.evaluate import dense_reference, evaluate, router_recall
from moefy.modeling.router_mlp import MLPRouter
from moefy.modeling.moe_layer import link_pregated
from moefy.modeling.selection import select_experts
from moefy.pipeline.route import train_mlp_router

log = logging.getLogger(__name__)


@torch.no_grad()
def dense_inputs(m: MoEModel, blocks: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Each layer's FFN input in the dense model (every expert active) on `blocks`, [N, D] per
    layer, tokens in the same order in every layer: what convert's routers are trained on."""
    per_batch = []
    with m.all_experts():
        for batch in blocks.split(batch_size):
            per_batch.append(m.layer_inputs(batch))
    return [torch.cat(xs) for xs in zip(*per_batch)]


def train_routers(m: MoEModel, inputs: list[torch.Tensor], cfg: MoEConfig) -> list[tuple[MLPRouter, dict]]:
    """A pre-gated router for every layer l >= 1 (its own router's shape and training settings),
    trained on inputs[l - 1] to predict layer l's expert output norms; the model is unchanged."""
    out = []
    for i, layer in enumerate(m.layers[1:], start=1):
        if not layer._mlp_router:
            raise ValueError(f"layer {i} has a {layer.spec['router']['kind']} router; pre-gating needs mlp routers")
        own = layer.router
        torch.manual_seed(cfg.seed + i)
        layer.router = MLPRouter(own.fc1.in_features, own.fc2.out_features, own.fc1.out_features, own.output)
        try:
            metrics = train_mlp_router(layer, inputs[i], loss=cfg.router_loss, steps=cfg.router_steps,
                                       lr=cfg.router_lr, seed=cfg.seed, router_inputs=inputs[i - 1])
            out.append((layer.router, metrics))
        finally:
            layer.router = own
        log.info("pre-gated router for layer %d: %s", i, metrics)
    return out


def pregate(m: MoEModel, routers: list[tuple[MLPRouter, dict]]) -> MoEModel:
    """A copy of `m` whose layers 1.. use the given pre-gated routers (train_routers)."""
    p = MoEModel(copy.deepcopy(m.model), m.tokenizer, copy.deepcopy(m.record))
    layers = p.layers
    for layer, (router, metrics) in zip(layers[1:], routers):
        layer.router = copy.deepcopy(router)
        layer.set_router_input("previous")
    link_pregated(layers)
    p.record.setdefault("moe", {})["router_input"] = "previous"
    for report, (_, metrics) in zip(p.record.get("layers", [])[1:], routers):
        report.update(metrics)
    return p


@torch.no_grad()
def agreement(own: MoEModel, pre: MoEModel, blocks: torch.Tensor) -> list[float]:
    """Per layer, the share of the own router's experts that the pre-gated router also picks,
    on the MoE model's own layer inputs (the own model's run)."""
    inputs = own.layer_inputs(blocks)
    out = []
    for i, (a, b) in enumerate(zip(own.layers, pre.layers)):
        x_router = inputs[i - 1] if b.router_input == "previous" else inputs[i]
        mine = a.route(inputs[i])
        theirs = select_experts(b.router(x_router), b.top_k, b.tau)
        out.append(float((mine & theirs).sum() / mine.sum()))
    return out


def analyse(m: MoEModel, calib: torch.Tensor, heldout: torch.Tensor, actives: list[float], cfg: MoEConfig,
            progress: bool = False) -> tuple[dict, MoEModel]:
    """Per-layer vs pre-gated routers on the same experts: held-out perplexity, oracle perplexity
    and router recall (vs the oracle's experts) at each active share; returns the JSON-able result
    and the pre-gated model."""
    routers = train_routers(m, dense_inputs(m, calib), cfg)
    pre = pregate(m, routers)
    reference = dense_reference(m, heldout, progress=progress)
    rows = []
    for share in actives:
        m.set_active(share)
        pre.set_active(share)
        own_r = evaluate(m, heldout, progress=progress, oracle=True, reference=reference)
        pre_r = evaluate(pre, heldout, progress=progress, reference=reference)
        per_layer = agreement(m, pre, heldout[:1])
        rows.append({"active_target": share, "dense_ppl": own_r["dense"]["ppl"], "oracle": own_r["oracle"],
                     "own": {**own_r["moe"], "ppl_ratio": own_r["ppl_ratio"],
                             "router_recall": own_r["oracle"]["router_recall"]},
                     "pregated": {**pre_r["moe"], "ppl_ratio": pre_r["ppl_ratio"],
                                  "router_recall": router_recall(pre, heldout[:1])},
                     "agreement": sum(per_layer[1:]) / (len(per_layer) - 1), "agreement_per_layer": per_layer})
    calib_recall = [metrics["router_recall"] for _, metrics in routers]
    own_recall = [r.get("router_recall") for r in m.record.get("layers", [])[1:]]
    return {"rows": rows, "tokens": int(heldout.numel()), "calib_tokens": int(calib.numel()),
            "pregated_calib_recall_per_layer": calib_recall, "own_calib_recall_per_layer": own_recall}, pre
