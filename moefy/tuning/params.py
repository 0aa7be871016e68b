"""What recovery tuning trains, and the memory a run needs for it (checked before any work)."""

from __future__ import annotations

import psutil
import torch

from moefy.errors import ConfigError
from moefy.model import MoEModel

TRAINABLE = {
    # experts and shared neurons of every MoE layer
    "ffn": ("w_in", "w_up", "b_in", "w_out", "shared_in", "shared_up", "shared_b_in", "shared_out"),
    # their down rows alone: a third of the FFN's weights, so a third of the gradients and
    # optimizer state (a 1.5B model's whole FFN tuning does not fit in 24 GB)
    "down": ("w_out", "shared_out"),
}


def trainable_parameters(m: MoEModel, what: str) -> dict[str, torch.nn.Parameter]:
    """The parameters `what` trains, by name; routers, embeddings and the output head stay out
    (routers never learn from the distillation loss, since top-k passes no gradient: with
    cfg.routers they learn their own objective, _RouterFit; the head and embeddings are most of
    a small model's weights and are not where the MoE error is)."""
    ffn_ids = _ffn_parameter_ids(m, "down" if what == "down" else "ffn")
    out = {}
    for name, p in m.model.named_parameters():
        if id(p) in ffn_ids:
            out[name] = p
        elif what == "all" and ".router." not in name and "embed" not in name and "lm_head" not in name \
                and "wte" not in name and "wpe" not in name:
            out[name] = p
    return out


def _ffn_parameter_ids(m: MoEModel, what: str = "ffn") -> set[int]:
    """ids of the experts' and shared neurons' parameters (TRAINABLE[what]) of every MoE layer."""
    return {id(getattr(layer, n)) for layer in m.layers for n in TRAINABLE[what] if getattr(layer, n) is not None}


def memory_needed(m: MoEModel, cfg) -> dict[str, int]:
    """Bytes tuning holds with the settings `cfg` (a TuneConfig), by what holds them: the student, the teacher (a copy of the dense
    model), gradients and AdamW's two moments of the trained weights (fp32), and the activations
    kept for the backward pass (every layer's, or with cfg.recompute each block's input alone)
    plus the two models' logits."""
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    trained = size(trainable_parameters(m, cfg.train).values())
    student = size(m.model.parameters()) + size(m.model.buffers())
    teacher = size(p for n, p in m.model.named_parameters() if ".router." not in n)
    c = m.model.config
    tokens = cfg.batch_size * cfg.seq_len
    hidden, layers = c.hidden_size, len(m.layers)
    ffn = m.layers[0].w_in.shape[0] * m.layers[0].w_in.shape[1]
    per_layer = tokens * 4 * (8 * hidden + 4 * ffn)  # attention and FFN intermediates, fp32, roughly
    saved = tokens * 4 * hidden * layers + per_layer if cfg.recompute else per_layer * layers
    logits = 4 * tokens * c.vocab_size * 4  # student and teacher logits and their log-softmax
    return {"student": student, "teacher": teacher, "gradients and optimizer": 3 * trained,
            "activations": saved + logits}


def check_memory(m: MoEModel, cfg, available: int | None = None):
    """Refuse, before any work, a tuning run that cannot fit in the free memory (CPU), saying
    which settings shrink it."""
    if next(m.model.parameters()).device.type != "cpu":
        return
    available = psutil.virtual_memory().available if available is None else available
    need = memory_needed(m, cfg)
    if sum(need.values()) <= available:
        return
    parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.items())
    hints = [h for h, on in (("--train down", cfg.train != "down"), ("--recompute", not cfg.recompute),
                             ("a smaller --batch-size", cfg.batch_size > 1)) if on]
    raise ConfigError(f"tuning needs about {sum(need.values()) / 2**30:.1f} GB ({parts}) but "
                      f"{available / 2**30:.1f} GB are free" + (f"; try {', '.join(hints)}" if hints else ""))
