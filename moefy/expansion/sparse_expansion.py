"""One-shot pruning and Sparse Expansion of every FFN, layer by layer (sequential calibration).

Sparse Expansion (Sawmya et al., "Wasserstein distances, neuronal entanglement and sparsity"):
per layer, project the FFN inputs on their top principal components, cluster them with k-means,
and prune one copy of the FFN per cluster from that cluster's inputs only; the router sends each
token to the copy of its nearest centroid. One expert is plain one-shot pruning.

Calibration is sequential as in SparseGPT: block l is calibrated on the hidden states produced by
blocks 0..l-1 *after* they were pruned. Inside an FFN, W_in and W_up are pruned from the FFN
inputs, then W_out from the hidden activations computed with the pruned W_in and W_up.

# N tokens, D hidden, I ffn width, E experts, P PCA dimensions
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from moefy.pipeline import data as data_mod
from moefy import provenance
from moefy.arch import DenseFFN, Family, family_for
from moefy.config import DataConfig
from moefy.model import MoEModel
from moefy.pipeline.calibrate import calibration_record
from moefy.errors import ConfigError, NonFiniteActivations
from moefy.pipeline.blocks import block_inputs, run_block
from moefy.modeling.modeling_moefy import install_moe
from moefy.expansion.pruning import InputStats, PruneConfig, prune, reconstruction_error
from moefy.modeling.sparse_ffn import ACTIVATIONS, SparseExpertFFN, nearest_centroid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpansionConfig:
    num_experts: int = 1     # sparse copies per FFN; 1 = plain one-shot pruning (no router)
    pca_dim: int = 16        # PCA dimensions the FFN inputs are clustered in
    kmeans_iters: int = 30   # Lloyd iterations (k-means++ initialisation)
    seed: int = 0            # seeds k-means; layer i uses seed + i

    def validate(self, prune_cfg: PruneConfig, hidden: int | None = None):
        if self.num_experts < 1:
            raise ConfigError(f"experts must be at least 1, got {self.num_experts}")
        if self.num_experts > 1 and prune_cfg.method == "magnitude":
            raise ConfigError("magnitude pruning ignores the inputs, so every expert would be the same; "
                              "use --method sparsegpt or wanda with --experts > 1")
        if self.pca_dim < 1 or (hidden is not None and self.pca_dim > hidden):
            raise ConfigError(f"pca_dim must be in [1, hidden size], got {self.pca_dim}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters must be positive, got {self.kmeans_iters}")


def sparse_layers(model) -> list[SparseExpertFFN]:
    return [m for m in model.modules() if isinstance(m, SparseExpertFFN)]


def set_execution(model, mode: str):
    """"sparse" (CSR products) or "dense" (each routed expert expanded for the call: same numbers
    up to summation order, faster for perplexity on CPU at moderate sparsity)."""
    if mode not in ("sparse", "dense"):
        raise ConfigError(f"execution must be sparse or dense, got {mode!r}")
    for layer in sparse_layers(model):
        layer.execution = mode


def ffn_flops(model) -> dict:
    """FFN FLOPs per token of the pruned model (its expert's non-zeros, router counted) and of the
    dense model it came from."""
    layers = sparse_layers(model)
    dense = sum(l.dense_flops_per_token() for l in layers)
    sparse = sum(l.flops_per_token() for l in layers)
    router = sum(l.router_flops_per_token() for l in layers)
    return {"dense_ffn_flops_per_token": dense, "ffn_flops_per_token": sparse, "router_flops_per_token": router,
            "active_ffn_share": sparse / dense}


def sparsify(model, tokenizer, prune_cfg: PruneConfig, expansion: ExpansionConfig = ExpansionConfig(),
             data: DataConfig = DataConfig(), *, source: str = "", progress: bool = False) -> MoEModel:
    """Prune (one expert) or sparse-expand (several) every FFN of `model` in place, calibrated on
    `data`; returns the model, ready for moefy.save, with a record of how it was made."""
    family = family_for(model.config)
    prune_cfg.validate()
    expansion.validate(prune_cfg, family.dense_ffn(family.block_list(model)[0], model.config).hidden)
    data.validate()
    calib = data_mod.blocks(data.source, tokenizer, data.seq_len, max_tokens=data.tokens,
                            min_tokens=expansion.num_experts * data.seq_len)
    weights = provenance.weights_hash(source, model)  # before any FFN is pruned
    states = block_inputs(model, family, calib, data.batch_size)
    layers, reports = [], []
    for i, block in enumerate(tqdm(family.block_list(model), desc="pruning", disable=None if progress else True)):
        x = ffn_inputs(block, family, states)  # [N, D]
        if not torch.isfinite(x).all():
            raise NonFiniteActivations(f"NaN or Inf in the FFN inputs of layer {i}; check the model weights and --dtype")
        layer, report = expand_ffn(family.dense_ffn(block, model.config), x, prune_cfg, expansion, expansion.seed + i)
        block.set_submodule(family.ffn, layer)
        for path in family.identity:
            block.set_submodule(path, torch.nn.Identity())
        layer.execution = "dense"  # same numbers as CSR up to summation order, faster for 16k tokens
        states = [(run_block(block, h, kw), kw) for h, kw in states]
        layer.execution = "sparse"
        layers.append(layer)
        reports.append({"layer": i, **report})
        log.info("layer %d: %s", i, report)
    model.config.moefy = {"blocks": family.blocks_path(model), "ffn": family.ffn,
                          "identity": list(family.identity), "layers": [l.spec for l in layers]}
    install_moe(model, model.config.moefy, layers)
    record = {"source": source, "source_weights": weights, "kind": "sparse_expansion", "family": family.name,
              "prune": prune_cfg.to_dict(), "expansion": asdict(expansion),
              "calibration": calibration_record(data, calib), "layers": reports}
    return MoEModel(model.eval(), tokenizer, record)


# -- sequential calibration -------------------------------------------------------------------


@torch.no_grad()
def ffn_inputs(block, family: Family, states) -> torch.Tensor:
    """The FFN input of every calibration token as block sees it, [N, D]."""
    xs = []
    handle = block.get_submodule(family.ffn).register_forward_pre_hook(
        lambda _m, args: xs.append(args[0].reshape(-1, args[0].shape[-1]).float()))
    try:
        for h, kw in states:
            run_block(block, h, kw)
    finally:
        handle.remove()
    return torch.cat(xs)


# -- one FFN ----------------------------------------------------------------------------------


def cluster(x: torch.Tensor, num_experts: int, pca_dim: int, iters: int, seed: int):
    """PCA of x [N, D] to P dimensions (eigenvectors of the covariance), then k-means++ in that
    space (scipy). Returns (mean [D], basis [P, D], centroids [E, P])."""
    from scipy.cluster.vq import kmeans2

    mean = x.double().mean(0)
    xc = x.double() - mean
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    basis = evecs[:, -pca_dim:].flip(1).T.contiguous()  # [P, D], largest variance first
    z = (xc @ basis.T).numpy()
    centroids, _ = kmeans2(z, num_experts, iter=iters, minit="++", seed=np.random.default_rng(seed))
    return mean.float(), basis.float(), torch.from_numpy(centroids).float()


@torch.no_grad()
def expand_ffn(ffn: DenseFFN, x: torch.Tensor, cfg: PruneConfig, expansion: ExpansionConfig, seed: int):
    """Sparse experts for one FFN from its calibration inputs x [N, D]; (layer, report)."""
    E = expansion.num_experts
    route = {}
    if E > 1:
        mean, basis, centroids = cluster(x, E, expansion.pca_dim, expansion.kmeans_iters, seed)
        route = dict(pca_mean=mean, pca_basis=basis, centroids=centroids)
        labels = nearest_centroid((x - mean) @ basis.T, centroids)  # the router's rule: clusters = routing
    else:
        labels = torch.zeros(x.shape[0], dtype=torch.long)
    experts, sizes = [], torch.bincount(labels, minlength=E).tolist()
    for e in range(E):
        xe = x[labels == e] if sizes[e] else x  # an empty cluster (never routed in calibration) gets every token
        experts.append(prune_ffn(ffn, xe, cfg))
    layer = SparseExpertFFN.from_experts(kind=ffn.kind, act=ffn.act, experts=experts, b_in=ffn.b_in,
                                         b_out=ffn.b_out, **route).requires_grad_(False)
    layer.execution = "dense"
    probe = x[:: max(1, len(x) // 4096)]  # the FFN's relative output error on (up to) 4096 calibration tokens
    y_dense, y = dense_forward(ffn, probe), layer(probe)
    layer.execution = "sparse"
    err = float((y - y_dense).square().sum() / y_dense.square().sum())
    return layer, {"cluster_sizes": sizes, "ffn_relative_error": err}


def prune_ffn(ffn: DenseFFN, x: torch.Tensor, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """One pruned copy of the FFN from inputs x [N, D]: W_in and W_up from x, then W_out from the
    hidden activations the pruned W_in, W_up produce (nn.Linear orientation)."""
    w = _linear(ffn)
    stats = _stats(x, cfg)
    out = {name: prune(w[name], stats, cfg) for name in ("w_in", "w_up") if name in w}
    h = hidden(ffn, x, out["w_in"], out.get("w_up"))  # [N, I]
    out["w_out"] = prune(w["w_out"], _stats(h, cfg), cfg)
    return out


def _stats(x: torch.Tensor, cfg: PruneConfig) -> InputStats | None:
    if cfg.method == "magnitude":
        return None
    stats = InputStats(x.shape[1], diagonal_only=cfg.method != "sparsegpt")
    for chunk in x.split(4096):
        stats.add_batch(chunk)
    return stats


def _linear(ffn: DenseFFN) -> dict[str, torch.Tensor]:
    w = {"w_in": ffn.w_in, "w_out": ffn.w_out.T.contiguous()}
    if ffn.w_up is not None:
        w["w_up"] = ffn.w_up
    return w


def hidden(ffn: DenseFFN, x, w_in, w_up=None) -> torch.Tensor:
    h = ACTIVATIONS[ffn.act](torch.nn.functional.linear(x, w_in, ffn.b_in))
    return h * (x @ w_up.T) if w_up is not None else h


def dense_forward(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    y = hidden(ffn, x, ffn.w_in, ffn.w_up) @ ffn.w_out
    return y if ffn.b_out is None else y + ffn.b_out


__all__ = ["ExpansionConfig", "sparsify", "sparse_layers", "set_execution", "ffn_flops", "expand_ffn", "prune_ffn", "cluster",
           "block_inputs", "reconstruction_error"]
