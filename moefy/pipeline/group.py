"""Neuron -> expert partitions: named strategies, each giving balanced experts of equal size.

# I ffn width, D hidden, E routed experts, n neurons per expert, S shared neurons
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moefy.arch import DenseFFN
from moefy.pipeline.stats import FFNStats


@dataclass(frozen=True)
class ExpertSplit:
    """shared: neuron ids always computed [S]; experts: neuron ids of each routed expert [E, n].
    Every neuron of the FFN appears exactly once."""

    shared: torch.Tensor
    experts: torch.Tensor

    def check(self, width: int):
        ids = torch.cat([self.shared, self.experts.flatten()]).sort().values
        if not torch.equal(ids, torch.arange(width)):
            raise AssertionError("expert split does not cover every neuron exactly once")


GroupFn = Callable[[DenseFFN, FFNStats, torch.Tensor, int, int], torch.Tensor]
GROUPINGS: dict[str, GroupFn] = {}
NEEDS_COACTIVATION = {"coactivation"}


def register(name: str):
    def wrap(fn: GroupFn) -> GroupFn:
        GROUPINGS[name] = fn
        return fn
    return wrap


def split_neurons(method: str, ffn: DenseFFN, stats: FFNStats, num_experts: int, shared: float,
                  seed: int) -> ExpertSplit:
    """Split the FFN's neurons into `num_experts` slots of equal size; `shared` of the slots
    (rounded) go to the neurons with the highest activation rate (CMoE), the rest to `method`."""
    n = ffn.width // num_experts
    shared_slots = min(round(shared * num_experts), num_experts - 1)
    by_rate = torch.argsort(stats.activation_rate, descending=True, stable=True)
    shared_ids = by_rate[: shared_slots * n].sort().values
    routed = by_rate[shared_slots * n:].sort().values
    if n == 1:  # every neuron its own expert: nothing to group, whatever the method
        groups = torch.arange(len(routed)).view(-1, 1)
    else:
        groups = GROUPINGS[method](ffn, stats, routed, num_experts - shared_slots, seed)  # [E, n] local
    split = ExpertSplit(shared_ids, routed[groups].sort(dim=1).values)
    split.check(ffn.width)
    return split


@register("random")
def random_split(ffn, stats, neurons, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(len(neurons), generator=g).view(num_experts, -1)


@register("param-kmeans")
def param_kmeans(ffn, stats, neurons, num_experts, seed):
    """MoEfication's parameter split: balanced k-means on the L2-normalised input (gate) rows."""
    from k_means_constrained import KMeansConstrained

    rows = torch.nn.functional.normalize(ffn.w_in[neurons], dim=1).double().numpy()
    n = len(neurons) // num_experts
    km = KMeansConstrained(n_clusters=num_experts, size_min=n, size_max=n, n_init=1, max_iter=50,
                           random_state=seed)
    return _groups_from_labels(km.fit_predict(rows), num_experts)


@register("coactivation")
def coactivation(ffn, stats, neurons, num_experts, seed, neighbours: int = 256):
    """MoEfication's co-activation split: the graph with edge weight = how often two neurons are
    marked on the same token, cut into balanced parts by METIS, then rebalanced to equal sizes."""
    import pymetis

    A = stats.coactivation[neurons][:, neurons].double()
    A.fill_diagonal_(0)
    N = len(neurons)
    # Keep each neuron's strongest links (symmetrised), so the graph stays sparse for wide FFNs.
    k = min(N - 1, neighbours)
    keep = torch.zeros_like(A, dtype=torch.bool).scatter_(1, A.topk(k, dim=1).indices, True)
    keep |= keep.T.clone()
    keep.fill_diagonal_(False)
    scale = 1000.0 / max(float(A.max()), 1e-12)
    rows, cols = keep.nonzero(as_tuple=True)
    weights = (A[rows, cols] * scale).round().long().clamp_min(1)
    xadj = np.concatenate([[0], np.cumsum(keep.sum(1).numpy())])
    options = pymetis.Options(seed=seed)
    _, parts = pymetis.part_graph(num_experts, adjacency=pymetis.CSRAdjacency(xadj, cols.numpy()),
                                  eweights=weights.numpy(), options=options)
    labels = _rebalance(np.asarray(parts), A.numpy(), num_experts)
    return _groups_from_labels(labels, num_experts)


def _rebalance(labels: np.ndarray, affinity: np.ndarray, num_parts: int) -> np.ndarray:
    """Move neurons out of oversized parts until every part has exactly N / num_parts: each move
    takes the member least tied to its part to the undersized part it is most tied to."""
    labels = labels.copy()
    size = len(labels) // num_parts
    onehot = np.eye(num_parts)[labels]
    tie = affinity @ onehot  # [N, P]: total affinity of each neuron to each part
    counts = np.bincount(labels, minlength=num_parts)
    while (counts > size).any():
        p = int(np.argmax(counts))
        members = np.flatnonzero(labels == p)
        i = members[np.argmin(tie[members, p])]
        under = np.flatnonzero(counts < size)
        q = int(under[np.argmax(tie[i, under])])
        labels[i] = q
        counts[p] -= 1
        counts[q] += 1
        tie[:, p] -= affinity[:, i]
        tie[:, q] += affinity[:, i]
    return labels


def _groups_from_labels(labels, num_experts) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels))
    groups = [torch.nonzero(labels == e).flatten() for e in range(num_experts)]
    return torch.stack(groups)
