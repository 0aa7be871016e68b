"""Running decoder blocks one at a time: capture the inputs of the first block, run a block on
stored hidden states (the layer-by-layer conversion, the down refit and Sparse Expansion use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from moefy.arch import Family
from moefy.pipeline.stats import FFNStats
from moefy.pipeline.calibrate import capture


class StopForward(Exception):
    pass


@torch.no_grad()
def block_inputs(model, family: Family, blocks: torch.Tensor, batch_size: int, device=None) -> list[tuple]:
    """The first block's input per batch: (hidden states [b, L, D], the other keyword arguments
    the model passed to it: masks, position embeddings). The blocks themselves are not run (they
    may still be on the meta device)."""
    captured = []

    def hook(_m, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise StopForward

    handle = family.block_list(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    extra = {"use_cache": False} if family.causal else {}
    device = device or model.device
    try:
        for batch in blocks.split(batch_size):
            try:
                model(input_ids=batch.to(device), **extra)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def to_device(obj, device):
    """Tensors inside obj (nested tuples, lists, dicts) moved to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def hidden_of(h) -> torch.Tensor:
    """A batch of hidden states: in RAM, or a file written by _store (read into fresh memory)."""
    return load_file(h)["h"].clone() if isinstance(h, (str, Path)) else h


@torch.no_grad()
def run_layer(block, family: Family, states: list[tuple], stats: FFNStats | None, device: str,
              store: Callable[[int, torch.Tensor], object] = lambda j, h: h) -> list[tuple]:
    """Block on every batch of states [(hidden, kwargs)], its FFN inputs and hidden activations
    into `stats` (when given); the outputs, each passed through store (to keep it or spill it)."""
    out = []
    with capture(None, family, [stats] if stats is not None else [], blocks=[block]):
        for j, (h, kw) in enumerate(states):
            y = run_block(block, hidden_of(h).to(device), to_device(kw, device)).cpu()
            out.append((store(j, y), kw))
    return out
