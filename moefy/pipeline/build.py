"""Build the MoE layers from the calibration statistics: group each FFN's neurons into experts,
build its router, set its selection, swap it in; then the budget and the down refit."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from moefy.arch import family_for
from moefy.config import MoEConfig
from moefy.errors import ConfigError
from moefy.model import MoEModel
from moefy.modeling.modeling_moefy import install_moe
from moefy.modeling.compiled import DENSE_PROMPT_FROM
from moefy.modeling.moe_layer import MoEFFN
from moefy.pipeline.budget import apply_budget, error_curve, top_k_within
from moefy.pipeline.group import split_neurons
from moefy.pipeline.refit import refit_model
from moefy.pipeline.route import build_router, router_spec

log = logging.getLogger(__name__)


CURVE_TOKENS = 1024  # calibration tokens behind each layer's error curve (budget="sensitivity")


def build(model, tokenizer, stats: list, moe: MoEConfig, record: dict | None = None,
          progress: bool = False) -> MoEModel:
    """Group each FFN's neurons into experts, build its router, and swap in the MoE layer."""
    family = family_for(model.config)
    layers, reports = [], []
    bar = tqdm(family.block_list(model), desc="experts and routers", disable=None if progress else True)
    for i, block in enumerate(bar):
        previous = stats[i - 1].inputs if i > 0 else None
        layer, report = build_layer(i, family.dense_ffn(block, model.config), stats[i], moe, previous)
        layers.append(layer)
        reports.append(report)

    model.config.moefy = {"blocks": family.blocks_path(model), "ffn": family.ffn,
                          "identity": list(family.identity), "layers": [l.spec for l in layers]}
    install_moe(model, model.config.moefy, layers)
    record = {**(record or {}), "family": family.name, "moe": moe.to_dict(), "layers": reports}
    m = MoEModel(model.eval(), tokenizer, record)
    apply_budget(m, moe)
    if moe.refit_down is not None:  # on the final selections, so after the budget
        blocks = getattr(stats, "blocks", None)
        if blocks is None:
            raise ConfigError("the down refit runs the calibration text again: pass build() the Calibration "
                              "that calibrate() returns")
        refit_model(m, blocks, moe.refit_down, stats.record.get("batch_size", 8), progress=progress)
    m.set_dense_prompt_from(DENSE_PROMPT_FROM)  # last: every fit above ran the sparse paths
    return m


def build_layer(i: int, ffn, stats, moe: MoEConfig, previous: torch.Tensor | None = None) -> tuple[MoEFFN, dict]:
    """Layer i's MoE FFN from its dense FFN and FFNStats: grouping, router, selection; and its report.
    `previous`: layer i-1's kept FFN inputs, which a pre-gated router (router_input="previous") reads."""
    split = split_neurons(moe.method, ffn, stats, moe.experts_for(ffn.width), moe.shared, moe.seed + i)
    torch.manual_seed(moe.seed + i)  # router initialisation and training depend on the seed alone
    layer = MoEFFN.from_dense(ffn, split.shared, split.experts, router_spec(moe.router, moe))
    layer.set_selection(*_selection(layer, moe))
    pregated = moe.router_input == "previous" and i > 0  # Pre-gated MoE; the first layer has no previous one
    if pregated:
        if previous is None:
            raise ConfigError("pre-gated routers (--router-input previous) need the previous layer's inputs; "
                              "they are not available in --layerwise conversion")
        layer.set_router_input("previous")
    metrics = build_router(layer, stats.inputs, moe, router_inputs=previous if pregated else None)
    if moe.budget == "sensitivity":
        metrics["error_curve"] = error_curve(layer, stats.inputs[:CURVE_TOKENS])
    log.info("layer %d: %s", i, metrics)
    return layer.requires_grad_(False), {"layer": i, "top_k": layer.top_k, **metrics}


def _selection(layer: MoEFFN, moe: MoEConfig) -> tuple[int | None, float | None]:
    return (None, moe.tau) if moe.tau is not None else (top_k_within(layer, moe.active), None)
