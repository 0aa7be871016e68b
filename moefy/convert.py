"""The conversion pipeline, top to bottom:
profile activations -> group neurons into experts -> build routers -> swap FFN for MoE
(-> refit the down rows, when asked: refit.py)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import psutil
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import distributed
from . import models, provenance
from .arch import Family, family_for
from .budget import allocate, error_curve
from .config import DataConfig, MoEConfig
from .errors import ConfigError, OutOfMemory
from .grouping import NEEDS_COACTIVATION, split_neurons
from .modeling_moefy import install_moe
from .moe_layer import MoEFFN, sketch_channels_for
from .profiling import profile
from .refit import refit_model
from .routing import build_router, router_spec

log = logging.getLogger(__name__)

MIN_CALIB_TOKENS = {"mlp": 2048}  # trained routers need this many tokens; others need one block
CURVE_TOKENS = 1024  # calibration tokens behind each layer's error curve (budget="sensitivity")


@dataclass
class MoEModel:
    """A converted model: the transformers model with MoEFFN layers, its tokenizer, and the
    record of how it was made (settings, per-layer assignment and router metrics)."""

    model: torch.nn.Module
    tokenizer: object
    record: dict = field(default_factory=dict)

    @property
    def family(self) -> Family:
        return family_for(self.model.config)

    @property
    def layers(self) -> list[MoEFFN]:
        return [m for m in self.model.modules() if isinstance(m, MoEFFN)]

    def set_routing(self, *, top_k: int | None = None, tau: float | None = None):
        """Change the selection rule after conversion: a fixed top-k, or dynamic-k with tau."""
        fewest = min(layer.spec["num_experts"] for layer in self.layers)
        if top_k is None and tau is None:
            raise ConfigError("give top_k or tau")
        if top_k is not None and not 1 <= top_k <= fewest:
            raise ConfigError(f"top-k must be in [1, {fewest}], got {top_k}")
        if tau is not None and not 0 <= tau < 1:
            raise ConfigError(f"tau must be in [0, 1), got {tau}")
        for layer in self.layers:
            layer.set_selection(top_k, tau)

    def set_router_channels(self, channels: float):
        """Every sketch router's share of input channels, fixed from now on (set the active share
        after it: the router's cost, and so the top-k a share allows, depends on it)."""
        if not 0 < channels <= 1:
            raise ConfigError(f"router channels must be in (0, 1], got {channels}")
        kinds = {layer.spec["router"]["kind"] for layer in self.layers}
        if kinds != {"sketch"}:
            raise ConfigError(f"--router-channels applies to sketch routers; this model's are {', '.join(sorted(kinds))}")
        for layer in self.layers:
            layer.set_router_channels(channels)

    def set_router_reuse(self, reuse: bool):
        """Whether every sketch router's selected neurons complete its partial sums. The neurons'
        cost, and so the top-k a share allows, changes: the model's recorded active share is
        applied again, when it has one and a fixed top-k (call set_active after it for another)."""
        kinds = {layer.spec["router"]["kind"] for layer in self.layers}
        if kinds != {"sketch"}:
            raise ConfigError(f"reusing partial sums applies to sketch routers; this model's are {', '.join(sorted(kinds))}")
        for layer in self.layers:
            layer.set_router_reuse(reuse)
        share = self.record.get("moe", {}).get("active")
        if share is not None and all(layer.top_k is not None for layer in self.layers):
            self.set_active(share)

    def set_router_approx(self, approx: float):
        """Every sketch router's approx share (sketched experts, see MoEFFN.approx_k). The top-k a
        share allows changes with it: the model's recorded active share is applied again, when it
        has one and a fixed top-k (call set_active after it for another share)."""
        if not 0 <= approx < 1:
            raise ConfigError(f"router approx share must be in [0, 1), got {approx}")
        kinds = {layer.spec["router"]["kind"] for layer in self.layers}
        if kinds != {"sketch"}:
            raise ConfigError(f"--router-approx applies to sketch routers; this model's are {', '.join(sorted(kinds))}")
        if approx and any(layer.tau is not None for layer in self.layers):
            raise ConfigError("--router-approx needs a fixed top-k; this model uses dynamic-k (tau)")
        for layer in self.layers:
            layer.set_router_approx(approx)
        share = self.record.get("moe", {}).get("active")
        if share is not None and all(layer.top_k is not None for layer in self.layers):
            self.set_active(share)

    def set_router_threshold(self, on: bool):
        """Every sketch router selects by its score thresholds (the mean counts of the top-k the
        active share allows; needs a model converted with them) or by that top-k itself."""
        kinds = {layer.spec["router"]["kind"] for layer in self.layers}
        if kinds != {"sketch"}:
            raise ConfigError(f"--router-threshold applies to sketch routers; this model's are {', '.join(sorted(kinds))}")
        if on and any(layer.tau is not None for layer in self.layers):
            raise ConfigError("--router-threshold needs a fixed top-k; this model uses dynamic-k (tau)")
        if on and not all(layer.router.grid for layer in self.layers):
            raise ConfigError("this model has no fitted score quantiles; convert it with --router-threshold")
        for layer in self.layers:
            layer.set_router_threshold(on)

    def set_active(self, share: float, budget: str | None = None):
        """Fixed top-k per layer within `share` of the dense FFN FLOPs (routers counted).
        budget="uniform": each layer the largest k that fits the share; "sensitivity": the model's
        total split across layers by their measured error curves (budget.py; needs a model
        converted with budget="sensitivity"). Default: the budget the model was converted with."""
        if not 0 < share <= 1:
            raise ConfigError(f"active share must be in (0, 1], got {share}")
        moe = self.record.get("moe", {})
        if moe.get("refit_down") is not None and moe.get("active") is not None and share != moe["active"]:
            log.warning("this model's down rows were refitted for %.3g active FFN; at %.3g they are not the fit's "
                        "(convert again with --active %.3g --refit-down %g for rows fitted to it)",
                        moe["active"], share, share, moe["refit_down"])
        budget = budget or moe.get("budget", "uniform")
        layers = self.layers
        if budget == "sensitivity":
            curves = [r.get("error_curve") for r in self.record.get("layers", [])]
            if len(curves) != len(layers) or any(c is None for c in curves):
                raise ConfigError("this model has no per-layer error curves; convert it with --budget sensitivity")
            ks = allocate(curves, [l.flops_per_token(1) - l.flops_per_token(0) for l in layers],
                          [l.flops_per_token(0) for l in layers], share * sum(l.dense_flops_per_token() for l in layers))
        elif budget == "uniform":
            follow = [l for l in layers if getattr(l.router, "auto", False)]  # sketch routers with auto channels
            before = [l.router.channels for l in follow]
            for layer in follow:
                layer.set_router_channels(sketch_channels_for(share, layer.router.reuse, layer.router.sparsity),
                                          auto=True)
            try:
                ks = [_top_k(layer, share) for layer in layers]  # all checked before any changes
            except ConfigError:
                for layer, channels in zip(follow, before):
                    layer.set_router_channels(channels, auto=True)
                raise
        else:
            raise ConfigError(f"unknown budget {budget!r}; choose uniform or sensitivity")
        for layer, k in zip(layers, ks):
            layer.set_selection(k, None)

    @property
    def all_experts_is_dense(self) -> bool:
        """Whether the model with every expert active computes its source dense model: true
        after conversion, false once recovery tuning or the down refit changed its weights."""
        return "tuning" not in self.record and self.record.get("moe", {}).get("refit_down") is None

    def source_model(self) -> torch.nn.Module:
        """The dense model this one was converted from, loaded again from its recorded source (the
        dense reference when all_experts_is_dense is false)."""
        from .errors import ModelLoadError

        source = self.record.get("source", "")
        try:
            return models.load(source).model.eval().requires_grad_(False)
        except ModelLoadError as exc:
            raise ModelLoadError(f"this model's weights changed after conversion (recovery tuning or the down "
                                 f"refit), so its dense reference is its source model {source!r}, which cannot "
                                 f"be loaded: {exc}") from exc

    @torch.no_grad()
    def layer_inputs(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """Each MoE layer's input when the model runs on `blocks` [B, L], as [B*L, D] per layer
        (in the current mode: wrap in all_experts() for the dense model's inputs)."""
        captured = []
        hooks = [layer.register_forward_pre_hook(lambda _m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
                 for layer in self.layers]
        try:
            self.model(input_ids=blocks)
        finally:
            for h in hooks:
                h.remove()
        return captured

    @contextlib.contextmanager
    def all_experts(self):
        """Every expert active: the model computes exactly the dense model."""
        with self._switch("all_experts"):
            yield self

    @contextlib.contextmanager
    def oracle(self):
        """Route by the true expert output norms (same k or tau): the best any router could do
        with these experts. Analysis only: it computes every expert to rank them."""
        with self._switch("oracle"):
            yield self

    @contextlib.contextmanager
    def _switch(self, flag: str):
        layers = self.layers
        before = [getattr(layer, flag) for layer in layers]  # restored on exit: the switches nest
        for layer in layers:
            setattr(layer, flag, True)
        try:
            yield
        finally:
            for layer, value in zip(layers, before):
                setattr(layer, flag, value)


def convert(model, calib: str = "wiki-sample", moe: MoEConfig = MoEConfig(),
            data: DataConfig | None = None, *, tokenizer=None, progress: bool = False,
            layerwise=None) -> MoEModel:
    """Turn a dense model (a name/path for models.load, a models.LoadedModel, or a transformers
    model with its tokenizer) into an MoE model, using calibration text `calib`.
    layerwise (a layerwise.LayerwiseConfig): calibrate and build one block at a time instead of
    profiling the whole model first (same result with propagate="dense"; see layerwise.py)."""
    data = data or DataConfig(source=calib)
    if isinstance(model, str):
        model = models.load(model)
    if isinstance(model, models.LoadedModel):
        model, tokenizer, source = model.model, model.tokenizer, model.source
        weights = provenance.weights_hash(source, model)
    else:
        source = getattr(model.config, "_name_or_path", "") or type(model).__name__
        weights = provenance.weights_hash(None, model)  # the model in memory, whatever its origin
    if tokenizer is None:
        raise ConfigError("convert() needs the tokenizer along with a loaded model")
    record = {"source": source, "source_weights": weights}
    if layerwise is not None:
        from .layerwise import convert_layers

        return convert_layers(model, tokenizer, moe, data, layerwise, record=record, progress=progress)
    stats = calibrate(model, tokenizer, moe, data, progress=progress)
    return build(model, tokenizer, stats, moe, record={**record, "calibration": stats.record}, progress=progress)


class Calibration(list):
    """Per-layer FFNStats, plus a record of the calibration data used and its token blocks."""

    record: dict
    blocks: torch.Tensor


def calibrate(model, tokenizer, moe: MoEConfig, data: DataConfig, progress: bool = False) -> Calibration:
    """Check the settings against the model, then profile its FFNs on the calibration text."""
    family = family_for(model.config)
    calib_blocks = calibration_blocks(model, tokenizer, moe, data)
    check_memory(model, calib_blocks.numel())
    stats = Calibration(profile(model, family, distributed.shard(calib_blocks, data.batch_size),
                                batch_size=data.batch_size, marker_share=moe.marker_share,
                                coactivation=moe.method in NEEDS_COACTIVATION, keep_inputs=data.tokens,
                                progress=progress))
    distributed.reduce(stats)  # torchrun: every rank now holds the statistics of all batches
    stats.record = calibration_record(data, calib_blocks)
    stats.blocks = calib_blocks  # all of them, on every rank (the down refit runs them in full)
    return stats


def calibration_blocks(model, tokenizer, moe: MoEConfig, data: DataConfig) -> torch.Tensor:
    """Check the settings against the model; the calibration token blocks [B, L]."""
    family = family_for(model.config)
    moe.validate(family.dense_ffn(family.block_list(model)[0], model.config).width)
    data.validate()
    return data_mod.blocks(data.source, tokenizer, data.seq_len, max_tokens=data.tokens,
                           min_tokens=MIN_CALIB_TOKENS.get(moe.router, data.seq_len))


def check_memory(model, tokens: int, available: int | None = None):
    """Refuse, before any work, a calibration whose FFN inputs alone exceed the memory free now:
    the all-at-once conversion keeps every layer's input of every calibration token (the routers,
    their thresholds and the down refit are fitted on them), 4 bytes x hidden size a token and a
    layer. SmolLM2-135M at 65,536 tokens: 4.2 GiB of inputs, 8.7 GiB peak. `available`: bytes
    free (default: what the OS reports)."""
    family = family_for(model.config)
    blocks = family.block_list(model)
    hidden = family.dense_ffn(blocks[0], model.config).hidden
    need = tokens * hidden * 4 * len(blocks)
    free = psutil.virtual_memory().available if available is None else available
    if need > free:
        raise OutOfMemory(f"{tokens} calibration tokens keep {need / 2**30:.1f} GiB of FFN inputs ({len(blocks)} "
                          f"layers x {hidden} floats a token), more than the {free / 2**30:.1f} GiB of memory free; "
                          f"lower --calib-tokens, or add --layerwise (one layer's inputs in memory at a time)")


def calibration_record(data: DataConfig, calib_blocks: torch.Tensor) -> dict:
    return {**data.__dict__, "tokens_used": calib_blocks.numel(),
            "token_ids_sha256": provenance.sha256_tokens(calib_blocks),
            "processes": distributed.world()[1]}  # > 1 under torchrun


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
    return m


def build_layer(i: int, ffn, stats, moe: MoEConfig, previous: torch.Tensor | None = None) -> tuple[MoEFFN, dict]:
    """Layer i's MoE FFN from its dense FFN and FFNStats: grouping, router, selection; and its report.
    `previous`: layer i-1's kept FFN inputs, which a pre-gated router (router_input="previous") reads."""
    split = split_neurons(moe.method, ffn, stats, moe.num_experts, moe.shared, moe.seed + i)
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


def apply_budget(m: MoEModel, moe: MoEConfig):
    """budget="sensitivity": split the active share across the layers by their error curves
    (needs every layer built); the reports follow the new top-k."""
    if moe.budget == "sensitivity" and moe.active is not None:
        m.set_active(moe.active)
        for report, layer in zip(m.record["layers"], m.layers):
            report["top_k"] = layer.top_k


def _selection(layer: MoEFFN, moe: MoEConfig) -> tuple[int | None, float | None]:
    return (None, moe.tau) if moe.tau is not None else (_top_k(layer, moe.active), None)


def _top_k(layer: MoEFFN, active: float) -> int:
    k = layer.top_k_for_share(active)
    if k < 1:
        share = layer.flops_per_token(0)  # router + shared neurons
        raise ConfigError(f"active share {active} leaves no room for a routed expert: the router and "
                          f"shared neurons already cost {share / layer.dense_flops_per_token():.1%} of the FFN; "
                          "raise --active, lower --shared or use more, smaller experts")
    return k
