"""Streaming per-layer FFN statistics from calibration text (accumulated in fp32).

# N tokens, D hidden, I ffn width
"""

from __future__ import annotations

import contextlib
import logging

import psutil
import torch
from tqdm.auto import tqdm

from moefy.arch import Family
from moefy import provenance
from moefy.arch import family_for
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError, OutOfMemory
from moefy.pipeline import data as data_mod
from moefy.pipeline import distributed
from moefy.pipeline.group import NEEDS_COACTIVATION
from moefy.pipeline.stats import FFNStats

log = logging.getLogger(__name__)


@contextlib.contextmanager
def capture(model, family: Family, stats: list[FFNStats], blocks=None):
    """Hooks on every FFN (of `blocks`, default all the model's): its input x and its hidden
    activation h (the output projection's input) go to that layer's FFNStats. The hooks are
    always removed."""
    handles = []
    for block, st in zip(family.block_list(model) if blocks is None else blocks, stats):
        pending = {}
        handles.append(block.get_submodule(family.ffn).register_forward_pre_hook(
            lambda _m, args, pending=pending: pending.__setitem__("x", args[0].detach())))
        handles.append(block.get_submodule(family.w_out).register_forward_pre_hook(
            lambda _m, args, pending=pending, st=st: st.add_batch(pending.pop("x"), args[0].detach())))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def profile(model, family: Family, blocks: torch.Tensor, *, batch_size: int, marker_share: float,
            coactivation: bool, keep_inputs: int, progress: bool = True) -> list[FFNStats]:
    """Run the calibration blocks [B, L] through the model once, collecting FFNStats per layer."""
    n_layers = len(family.block_list(model))
    stats = [FFNStats(f"layer {i}", marker_share, coactivation, keep_inputs) for i in range(n_layers)]
    with capture(model, family, stats):
        for batch in tqdm(blocks.split(batch_size), desc="profiling", disable=None if progress else True):
            model(input_ids=batch.to(model.device))
    log.info("profiled %d tokens in %d layers", stats[0].tokens, n_layers)
    return stats


MIN_CALIB_TOKENS = {"mlp": 2048}  # trained routers need this many tokens; others need one block


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
    ffn = family.dense_ffn(family.block_list(model)[0], model.config)
    moe.validate(ffn.width)
    if moe.router == "quant" and ffn.hidden % 32:
        raise ConfigError(f"the quant router stores 4-bit groups of 32 input channels; this model's hidden size "
                          f"{ffn.hidden} is not a multiple of 32: use --router sketch")
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
