"""Wasserstein neurons (Sawmya et al., "Wasserstein distances, neuronal entanglement and sparsity").

A neuron is row j of an FFN's input projection (the gate for SwiGLU, the input projection for
MLP FFNs); its output on token t is the pre-activation w_j . x_t (+ b_j). Its Wasserstein distance
is the 1-Wasserstein (W1) distance between its outputs over the calibration tokens and a Gaussian
with the same mean and variance. We standardise the outputs first (zero mean, unit variance), so
W1 is scale-free: it is the distance of the standardised outputs to N(0, 1), comparable across
neurons and layers. With N tokens the Gaussian is its N quantiles Phi^-1((i + 1/2) / N) (scipy),
and W1 between two samples of N equal atoms is the mean |difference| of the sorted samples,
which is what scipy.stats.wasserstein_distance returns for them (tested).

The experiment: sparsify the input rows (W_in and W_up) of each layer's top-W neurons vs as many
lowest-W (and random) neurons, with SparseGPT from the dense model's FFN inputs, and compare
held-out perplexity. High-W ("entangled") neurons should hurt most.

# N tokens, D hidden, I ffn width, L layers
"""

from __future__ import annotations

import contextlib
import logging

import torch

from moefy.arch import Family, family_for
from moefy.expansion.pruning import InputStats, sparsegpt

log = logging.getLogger(__name__)


@torch.no_grad()
def ffn_inputs(model, family: Family, blocks: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Every FFN's input on the calibration blocks [B, L] (dense model, one pass), [N, D] per layer."""
    xs: list[list[torch.Tensor]] = [[] for _ in family.block_list(model)]
    handles = [block.get_submodule(family.ffn).register_forward_pre_hook(
        lambda _m, a, out=out: out.append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for block, out in zip(family.block_list(model), xs)]
    try:
        for batch in blocks.split(batch_size):
            model(input_ids=batch.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs]


def gaussian_quantiles(n: int) -> torch.Tensor:
    from scipy.stats import norm

    return torch.from_numpy(norm.ppf((torch.arange(n, dtype=torch.float64).numpy() + 0.5) / n)).float()


def w1_to_gaussian(outputs: torch.Tensor) -> torch.Tensor:
    """W1 distance of each column of outputs [N, I] (standardised) to N(0, 1), [I]."""
    a = outputs.double()
    z = (a - a.mean(0)) / a.std(0, unbiased=False).clamp_min(1e-12)
    return (z.sort(0).values - gaussian_quantiles(len(a)).double()[:, None]).abs().mean(0).float()


def neuron_outputs(model, family: Family, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Pre-activations of layer's FFN neurons on inputs x [N, D] -> [N, I]."""
    ffn = family.dense_ffn(family.block_list(model)[layer], model.config)
    return torch.nn.functional.linear(x, ffn.w_in, ffn.b_in)


def wasserstein_distances(model, inputs: list[torch.Tensor], chunk: int = 256) -> list[torch.Tensor]:
    """W1 to the matching Gaussian of every FFN neuron, [I] per layer."""
    family = family_for(model.config)
    out = []
    for i, x in enumerate(inputs):
        h = neuron_outputs(model, family, i, x)  # [N, I]
        out.append(torch.cat([w1_to_gaussian(c) for c in h.split(chunk, dim=1)]))
    return out


def summary(distances: list[torch.Tensor]) -> list[dict]:
    rows = []
    for i, d in enumerate(distances):
        q = torch.quantile(d.double(), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
        rows.append({"layer": i, "mean": float(d.mean()), "median": q[0], "p90": q[1], "p99": q[2],
                     "max": float(d.max()), "w1": [round(float(v), 5) for v in d]})
    return rows


def select(distances: list[torch.Tensor], share: float, which: str, seed: int = 0) -> list[torch.Tensor]:
    """Per layer, the round(share * I) neurons with the highest ("top") or lowest ("bottom") W1,
    or as many at random ("random")."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in distances:
        k = max(1, round(share * len(d)))
        if which == "random":
            out.append(torch.randperm(len(d), generator=g)[:k])
        else:
            out.append(d.topk(k, largest=which == "top").indices)
    return out


@contextlib.contextmanager
@torch.no_grad()
def neurons_sparsified(model, inputs: list[torch.Tensor], neurons: list[torch.Tensor], sparsity: float):
    """Within the block, the chosen neurons' input rows (W_in, and W_up for SwiGLU) are pruned to
    `sparsity` with SparseGPT (rows are independent in SparseGPT, so pruning a subset of rows is
    SparseGPT on that subset), Hessian from the dense model's FFN inputs. Restored on exit."""
    family = family_for(model.config)
    saved = []
    try:
        for block, x, idx in zip(family.block_list(model), inputs, neurons):
            stats = InputStats(x.shape[1])
            for c in x.split(4096):
                stats.add_batch(c)
            hessian = stats.hessian()
            for path in filter(None, (family.w_in, family.w_up)):
                weight = block.get_submodule(path).weight
                saved.append((weight, weight.detach().clone()))
                rows = weight.T if family.conv1d else weight  # [I, D] view
                rows[idx] = sparsegpt(rows[idx], hessian, sparsity)
        yield model
    finally:
        for weight, original in saved:
            weight.copy_(original)


def analyse(model, tokenizer, data, eval_blocks: torch.Tensor | None = None, share: float = 0.1,
            sparsity: float = 0.9, seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    """W1 of every FFN neuron on the calibration text `data` (a DataConfig), per layer; with
    eval_blocks, also the experiment: held-out perplexity of the dense model and with the input
    rows of each layer's top-W, bottom-W and random `share` of neurons pruned to `sparsity`.
    Returns (result dict for JSON, the per-layer distances)."""
    from moefy.pipeline import data as data_mod
    from moefy.errors import ConfigError
    from moefy.eval.evaluate import perplexity

    if not 0 < share <= 0.5:
        raise ConfigError(f"neuron share must be in (0, 0.5] (top and bottom must not overlap), got {share}")
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    data.validate()
    family = family_for(model.config)
    calib = data_mod.blocks(data.source, tokenizer, data.seq_len, max_tokens=data.tokens)
    inputs = ffn_inputs(model, family, calib, data.batch_size)
    distances = wasserstein_distances(model, inputs)
    result = {"calibration": {"source": data.source, "tokens": int(calib.numel())},
              "neuron": "row of the FFN input projection (gate); output = its pre-activation",
              "distance": "W1(standardised outputs, N(0,1))", "layers": summary(distances)}
    if eval_blocks is not None and family.causal:
        exp = {"share": share, "sparsity": sparsity, "tokens": int(eval_blocks[:, 1:].numel()),
               "dense_ppl": perplexity(model, eval_blocks)[0]}
        for which in ("top", "bottom", "random"):
            chosen = select(distances, share, which, seed)
            with neurons_sparsified(model, inputs, chosen, sparsity):
                exp[f"{which}_ppl"] = perplexity(model, eval_blocks)[0]
            exp[f"{which}_mean_w1"] = float(torch.cat([d[c] for d, c in zip(distances, chosen)]).mean())
        result["experiment"] = exp
    return result, distances


def plot(distances: list[torch.Tensor], path, title: str = ""):
    """Per-layer box plots of the neurons' W1 and the pooled histogram, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    ax1.boxplot([d.numpy() for d in distances], whis=(1, 99), showfliers=True, flierprops={"markersize": 1.5})
    ax1.set_xlabel("layer")
    ax1.set_ylabel("W1(standardised neuron output, N(0,1))")
    ax1.set_xticks(range(1, len(distances) + 1), [str(i) for i in range(len(distances))], fontsize=7)
    ax1.set_title(title or "Wasserstein distance of FFN neurons to a Gaussian")
    pooled = torch.cat(distances).numpy()
    ax2.hist(pooled, bins=100, log=True)
    ax2.set_xlabel("W1")
    ax2.set_ylabel("neurons")
    ax2.set_title(f"all {len(pooled)} neurons")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["analyse", "ffn_inputs", "w1_to_gaussian", "wasserstein_distances", "summary", "select", "neurons_sparsified",
           "plot", "gaussian_quantiles"]
