"""MoEModel: a converted model (the transformers model with MoE layers), its tokenizer, and the
record of how it was made; the settings a user can change after conversion live here."""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field

import torch

from moefy.arch import Family, family_for
from moefy.errors import ConfigError
from moefy.modeling.moe_layer import MoEFFN
from moefy.modeling.router_sketch import sketch_channels_for
from moefy.pipeline import load as models
from moefy.pipeline.budget import allocate, top_k_within

log = logging.getLogger(__name__)

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
                ks = [top_k_within(layer, share) for layer in layers]  # all checked before any changes
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
        from moefy.errors import ModelLoadError

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
            with self.sparse_only():
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
    def sparse_only(self):
        """Every token through the sparse per-token computation, prompts included (no dense prompt
        path): how perplexity is scored and routes are studied, as decode runs."""
        with self._switch("sparse_only"):
            yield self

    def set_dense_prompt_from(self, tokens: int | None):
        """Calls of at least `tokens` tokens (a prompt) take the dense FFN, where it is faster;
        None: every call sparse."""
        for layer in self.layers:
            layer.set_dense_prompt_from(tokens)

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


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which `model`'s forward takes the KV cache: `cache` in newer transformers
    (`past_key_values` there is deprecated, removed in 5.40), `past_key_values` in older ones."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned: `out.cache` in newer transformers, `out.past_key_values` in older."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values
