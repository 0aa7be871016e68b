"""Down-row refit: a training-free stage after the routers. With each token's selection fixed,
an MoE layer's output keeps only the terms of the neurons it computes (shared, selected, and the
sketched ones with their estimates). The down rows that bring that output closest to the dense
FFN's on calibration text are one ridge regression per layer:

    W' = argmin ||A W' - B W||^2 + lam * mean(diag(A^T A)) * ||W' - W||^2

A [N, S + E*n]: the activations the layer's output uses (shared neurons, then the routed ones
masked by the selection); B: every neuron's exact activation; W: the shared and routed down rows.
The kept neurons take over part of what the dropped ones wrote; a neuron no token selected keeps
its rows (the ridge term). lam is relative to the mean diagonal, so one value suits every layer.

The layers are refitted in order on the inputs the sparse model gives them: the calibration text
runs block by block, each block's MoE layer refitted on the outputs of the blocks already
refitted before it. The selection the fit assumes is the layer's as converted. A sketch router
ranks by its down rows' norms, so with score thresholds (SketchRouter.threshold) its quantiles
are fitted again after the fit, on the same inputs (the new rows' norms; the share stays the
budget's).

Measured on SmolLM2-135M (BENCHMARKS.md, "Down rows refitted", "The down refit on a pruned
sketch"): a large gain at 25% active FFN; at 50% none with the unpruned sketch, 1.16x -> 1.13x
with a pruned one (--router-sparsity 0.33). A model refitted at one share is fitted to that
share's selections.

# N calibration tokens, D hidden, S shared neurons, E experts of n neurons
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from moefy.arch import family_for
from moefy.config import check_strength
from moefy.errors import ConfigError
from moefy.modeling.moe_layer import MoEFFN
from moefy.pipeline.blocks import StopForward, block_inputs, hidden_of, run_block, to_device

log = logging.getLogger(__name__)

CHUNK = 4096  # tokens per accumulation step
ERROR_TOKENS = 2048  # calibration tokens behind the reported output errors


@torch.no_grad()
def refit_model(m, blocks: torch.Tensor, lam: float, batch_size: int = 8, progress: bool = False) -> list[dict]:
    """Refit every MoE layer of the MoEModel `m` in order on the calibration blocks [B, L], each
    on the inputs the model gives it with the layers before it refitted; one report per layer
    (also merged into m.record["layers"])."""

    check(m.layers, lam)
    model = m.model
    family = family_for(model.config)
    states = block_inputs(model, family, blocks, batch_size)
    reports, layers = [], family.block_list(model)
    for i, block in enumerate(tqdm(layers, desc="down refit", disable=None if progress else True)):
        layer = block.get_submodule(family.ffn)
        reports.append(refit_layer(layer, ffn_inputs(block, layer, states), lam))
        log.info("layer %d down refit: %s", i, reports[-1])
        if i + 1 < len(layers):  # the next block's inputs, with this layer refitted
            states = [(run_block(block, h, kw), kw) for h, kw in states]
    for layer in m.layers:  # the passes above are calibration, not use
        layer.reset_counters()
    for report, extra in zip(m.record.get("layers", []), reports):
        report.update(extra)
    return reports


def check(layers: list[MoEFFN], lam: float):
    check_strength(lam)
    if any(layer.router_input != "own" for layer in layers):
        raise ConfigError("the down refit needs routers that read their own layer's input; "
                          "drop --refit-down or use --router-input own")


@torch.no_grad()
def ffn_inputs(block: torch.nn.Module, layer: MoEFFN, states: list[tuple]) -> torch.Tensor:
    """The inputs [N, D] of `block`'s MoE layer over every batch of states [(hidden, kwargs)]
    (the block stops there: the layer itself does not run)."""

    captured = []

    def hook(_m, args):
        captured.append(args[0].reshape(-1, args[0].shape[-1]))
        raise StopForward

    handle = layer.register_forward_pre_hook(hook)
    device = layer.w_in.device
    try:
        for h, kw in states:
            try:
                run_block(block, hidden_of(h).to(device), to_device(kw, device))
            except StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


@torch.no_grad()
def refit_layer(layer: MoEFFN, x: torch.Tensor, lam: float, chunk: int = CHUNK) -> dict:
    """Refit the shared and routed down rows of `layer` on its inputs x [N, D] (see the module
    docstring). Returns the layer's relative output error against the dense FFN on (up to
    ERROR_TOKENS of) x, before and after: ||y - y_dense||^2 / ||y_dense||^2. When the refitted
    layer's error is not lower (its new selection can cost more than the rows gain), the layer
    is left as it was ("kept": false)."""
    check([layer], lam)
    probe = x[_probe(len(x)).to(x.device)]
    thresholded = layer.thresholded
    dense = _dense_outputs(layer, probe)  # before the rows change: every expert active is the dense FFN only now
    before = output_error(layer, probe, dense)
    w32 = _down_rows(layer).float()  # [S + E*n, D]
    fitted = ridge_rows(layer, x, lam, chunk=chunk)
    saved = w32.clone(), (layer.router.grid, layer.router.quantiles.clone()) if thresholded else None
    _set_down_rows(layer, fitted)
    if thresholded:
        layer.fit_score_quantiles(x)  # the sketch ranks by the new rows' norms
    after = output_error(layer, probe, dense)
    kept = after < before
    if not kept:  # the new selection undid the gain: the layer stays as converted
        _set_down_rows(layer, saved[0])
        if thresholded:
            layer.router.set_quantiles(*saved[1])
    layer.reset_counters()
    return {"down_refit": {"lam": lam, "tokens": len(x), "error_before": before, "error_after": after, "kept": kept}}


@torch.no_grad()
def ridge_rows(layer: MoEFFN, x: torch.Tensor, lam: float, rows: torch.Tensor | None = None, target=None,
               chunk: int = CHUNK) -> torch.Tensor:
    """argmin ||A W' - T||^2 + lam * mean(diag(A^T A)) * ||W' - W||^2 [S + E*n, D] on the inputs
    x [N, D], A from the layer's selection as it is now. W: `rows` (default: the layer's down
    rows). T: the dense output B W, or target(B W, s) for the chunk x[s] (the studies' variants)."""
    w32 = (_down_rows(layer) if rows is None else rows).float()
    w = w32.double()
    gram = torch.zeros(len(w), len(w), dtype=torch.float64, device=w.device)
    rhs = torch.zeros_like(w)
    for start in range(0, len(x), chunk):  # fp32 products over a chunk, summed in fp64
        a, b = _activations(layer, x[start:start + chunk])
        t = b @ w32
        if target is not None:
            t = target(t, slice(start, start + chunk))
        gram += (a.T @ a).double()
        rhs += (a.T @ t).double()
    ridge = lam * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.linalg.solve(gram + ridge * torch.eye(len(w), dtype=gram.dtype, device=gram.device), rhs + ridge * w)


def _probe(n: int) -> torch.Tensor:
    """The evenly spaced ERROR_TOKENS of n tokens (all of them when fewer) behind the errors."""
    return torch.linspace(0, n - 1, min(ERROR_TOKENS, n)).long()


def _activations(layer: MoEFFN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for x [T, D]: the activations the layer's output uses, and every neuron's exact one,
    [T, S + E*n] each (shared neurons first, then the routed ones expert-major)."""
    x = x.to(layer.w_in.dtype)
    b = layer.hidden_all(x)
    a = layer.selected_hidden(x, full=b).flatten(1)
    if layer.shared_in is not None:
        s = layer._hidden(x, layer.shared_in, layer.shared_up, layer.shared_b_in)
        a, b = torch.cat([s, a], 1), torch.cat([s, b], 1)
    return a.float(), b.float()


def _down_rows(layer: MoEFFN) -> torch.Tensor:
    rows = layer.w_out.flatten(0, 1)
    return rows if layer.shared_out is None else torch.cat([layer.shared_out, rows])


def _set_down_rows(layer: MoEFFN, rows: torch.Tensor):
    S = 0 if layer.shared_out is None else len(layer.shared_out)
    if S:
        layer.shared_out.copy_(rows[:S])
    layer.w_out.copy_(rows[S:].view_as(layer.w_out))


def _dense_outputs(layer: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on x [T, D] with every expert active (the dense FFN while its rows are
    the dense ones)."""
    before = layer.all_experts
    layer.all_experts = True
    try:
        return layer(x.to(layer.w_in.dtype)).double()
    finally:
        layer.all_experts = before


def output_error(layer: MoEFFN, x: torch.Tensor, dense: torch.Tensor) -> float:
    """||y - dense||^2 / ||dense||^2 of the layer's own forward on x [T, D] against the dense
    outputs [T, D] (the counters are left as they were)."""
    counters = layer.tokens_seen, layer.experts_selected, layer.sketched_selected
    y = layer(x.to(layer.w_in.dtype)).double()
    layer.tokens_seen, layer.experts_selected, layer.sketched_selected = counters
    return float((y - dense).square().sum() / dense.square().sum().clamp_min(1e-30))
