"""Router construction and training for MoEFFN layers.

# N calibration tokens, D hidden, I ffn width, E routed experts, n neurons per expert, K top-k
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from moefy.modeling.router_sketch import SKETCH_APPROX_DEFAULT, sketch_channels_for
from moefy.modeling.moe_layer import MoEFFN
from moefy.modeling.selection import select_experts

log = logging.getLogger(__name__)


def router_spec(kind: str, cfg) -> dict:
    """The router entry of a MoEFFN spec for a MoEConfig."""
    if kind == "mlp":
        output = {"norm": "norm", "log-norm": "log-norm", "bce": "probability"}[cfg.router_loss]
        return {"kind": "mlp", "options": {"router_hidden": cfg.router_hidden, "output": output}}
    if kind == "sketch":
        auto = cfg.router_channels is None
        sparsity = cfg.router_sparsity
        reuse = cfg.router_reuse  # a pruned sketch's too: its selected neurons add what it left out
        channels = sketch_channels_for(cfg.active, reuse, sparsity) if auto else cfg.router_channels
        options = {"channels": channels, "auto": auto, "reuse": reuse, **_selection_options(cfg)}
        return {"kind": "sketch", "options": {**options, "sparsity": sparsity} if sparsity else options}
    if kind == "quant":
        return {"kind": "quant", "options": {"bits": 4, **_selection_options(cfg)}}
    return {"kind": kind}


def _selection_options(cfg) -> dict:
    """A sketch or quantised router's approx share and thresholds: the defaults with a fixed
    top-k (SKETCH_APPROX_DEFAULT, thresholds on), none with dynamic-k (tau)."""
    approx = cfg.router_approx
    if approx is None:
        approx = SKETCH_APPROX_DEFAULT if cfg.tau is None else 0.0
    threshold = cfg.router_threshold
    return {"approx": approx, "threshold": cfg.tau is None if threshold is None else threshold}


@torch.no_grad()
def init_similarity(moe: MoEFFN):
    """MoEfication: expert centre = mean of its L2-normalised input rows."""
    moe.router.centres.copy_(F.normalize(moe.w_in, dim=-1).mean(1))


@torch.no_grad()
def init_representative(moe: MoEFFN, inputs: torch.Tensor):
    """CMoE: each expert's representative is the neuron whose |h| over calibration tokens follows
    the expert's output norm most closely (highest correlation)."""
    E, n, _ = moe.w_in.shape
    h = moe.hidden_all(inputs).abs().view(-1, E, n)  # [N, E, n]
    h = h - h.mean(0)
    t = moe.expert_norms(inputs)  # [N, E]
    t = t - t.mean(0)
    corr = (h * t[:, :, None]).sum(0) / (h.norm(dim=0) * t.norm(dim=0)[:, None] + 1e-12)  # [E, n]
    idx = torch.arange(E), corr.argmax(1)
    r = moe.router
    r.w_in.copy_(moe.w_in[idx])
    if r.w_up is not None:
        r.w_up.copy_(moe.w_up[idx])
    if r.b_in is not None:
        r.b_in.copy_(moe.b_in[idx])


def router_targets(moe: MoEFFN, inputs: torch.Tensor, loss: str) -> torch.Tensor:
    """D2DMoE ("norm"): each expert's output norm, scaled to mean 1; "log-norm": log(1 + that),
    so a few tokens with huge norms do not dominate the fit. MoEfication ("bce"): the sum of the
    expert's |h|, divided by the token's largest such sum, in [0, 1]."""
    with torch.no_grad():
        if loss in ("norm", "log-norm"):
            t = moe.expert_norms(inputs)
            t = t / t.mean().clamp_min(1e-12)
            return t if loss == "norm" else torch.log1p(t)
        E, n, _ = moe.w_in.shape
        s = moe.hidden_all(inputs).abs().view(-1, E, n).sum(-1)
        return s / s.amax(-1, keepdim=True).clamp_min(1e-12)


def router_objective(moe: MoEFFN):
    """(target kind for router_targets, loss function) of an MLP router, from its output."""
    loss = {"norm": "norm", "log-norm": "log-norm", "probability": "bce"}[moe.router.output]
    return loss, F.binary_cross_entropy_with_logits if loss == "bce" else F.mse_loss


def train_mlp_router(moe: MoEFFN, inputs: torch.Tensor, *, loss: str, steps: int, lr: float,
                     seed: int, batch_size: int = 512, router_inputs: torch.Tensor | None = None) -> dict:
    """Fit the MLP router on calibration inputs (backbone frozen); returns validation metrics.
    The targets come from the layer's own inputs [N, D]; the router reads `router_inputs` [N, D]
    when given (Pre-gated MoE: the previous layer's inputs for the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    targets = router_targets(moe, inputs, loss)  # [N, E]
    x = inputs if router_inputs is None else router_inputs
    perm = torch.randperm(len(inputs), generator=g)
    n_val = max(1, len(inputs) // 10)
    val, train = perm[:n_val], perm[n_val:]
    router = moe.router
    mean = targets[train].mean(0)
    with torch.no_grad():  # start the output bias at the mean target: faster, steadier fits
        router.fc2.bias.copy_(torch.logit(mean.clamp(1e-4, 1 - 1e-4)) if loss == "bce" else mean)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    objective = F.binary_cross_entropy_with_logits if loss == "bce" else F.mse_loss
    with torch.enable_grad():
        router.train()
        for _ in range(steps):
            b = train[torch.randint(len(train), (batch_size,), generator=g)]
            out = objective(router.logits(x[b]), targets[b])
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            sched.step()
        router.eval()
    opt.zero_grad(set_to_none=True)  # no stale gradients left on the saved router
    router.requires_grad_(False)
    with torch.no_grad():
        val_loss = float(objective(router.logits(x[val]), targets[val]))
    return {"router_val_loss": val_loss,
            "router_recall": recall(moe, inputs[val], None if router_inputs is None else router_inputs[val])}


@torch.no_grad()
def recall(moe: MoEFFN, inputs: torch.Tensor, router_inputs: torch.Tensor | None = None) -> float:
    """Share of the oracle's experts (largest true output norms, same count per token) that the
    router selects; a pre-gated router reads `router_inputs` (the previous layer's inputs)."""
    x = moe._router_in(inputs) if router_inputs is None else router_inputs
    chosen = moe.route(x) if moe.thresholded else select_experts(moe.router(x), moe.top_k, moe.tau)  # [N, E]
    k = chosen.sum(-1, keepdim=True)
    norms = moe.expert_norms(inputs)
    rank = norms.argsort(-1, descending=True).argsort(-1)
    oracle = rank < k
    return float((chosen & oracle).sum() / oracle.sum())


def build_router(moe: MoEFFN, inputs: torch.Tensor, cfg, router_inputs: torch.Tensor | None = None) -> dict:
    """Initialise or train `moe.router` for its kind (a sketch router needs neither: it reads the
    expert weights); returns metrics for the report. With
    `router_inputs` (an mlp router only) the router learns to pick this layer's experts from them."""
    kind = moe.spec["router"]["kind"]
    if router_inputs is not None and kind != "mlp":
        raise ValueError(f"only a trained mlp router can read another layer's inputs, not {kind!r}")
    if kind == "similarity":
        init_similarity(moe)
    elif kind == "representative":
        init_representative(moe, inputs)
    elif kind == "mlp":
        return train_mlp_router(moe, inputs, loss=cfg.router_loss, steps=cfg.router_steps,
                                lr=cfg.router_lr, seed=cfg.seed, router_inputs=router_inputs)
    elif kind == "sketch":
        if moe.router.sparsity:
            moe.fit_sketch_sparsity(inputs)
            if cfg.tau is None and cfg.active is not None:  # the top-k a share allows, at the density measured
                moe.set_selection(max(1, moe.top_k_for_share(cfg.active)), None)
        if moe.router.threshold:
            moe.fit_score_quantiles(inputs)
    elif kind == "quant":
        moe.router.quantize_weights()
        if moe.router.threshold:
            moe.fit_score_quantiles(inputs)
    return {"router_recall": recall(moe, inputs[: len(inputs) // 10 or 1])}
