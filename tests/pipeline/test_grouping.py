import numpy as np
import pytest
import torch

from moefy.arch import DenseFFN
from moefy.pipeline.group import GROUPINGS, _rebalance, split_neurons
from moefy.pipeline.stats import FFNStats

I, D = 64, 16


@pytest.fixture
def ffn_and_stats():
    g = torch.Generator().manual_seed(0)
    ffn = DenseFFN("swiglu", "silu", torch.randn(I, D, generator=g), torch.randn(I, D, generator=g), None,
                   torch.randn(I, D, generator=g), None)
    stats = FFNStats("layer 0", marker_share=0.25, coactivation=True, keep_inputs=0)
    x = torch.randn(512, D, generator=g)
    h = torch.nn.functional.silu(x @ ffn.w_in.T) * (x @ ffn.w_up.T)
    stats.add_batch(x, h)
    return ffn, stats


@pytest.mark.parametrize("method", sorted(GROUPINGS))
@pytest.mark.parametrize("shared", [0.0, 0.25])
def test_every_neuron_once_and_balanced(method, shared, ffn_and_stats):
    ffn, stats = ffn_and_stats
    split = split_neurons(method, ffn, stats, num_experts=8, shared=shared, seed=0)
    assert split.experts.shape == (8 - round(shared * 8), 8)
    ids = torch.cat([split.shared, split.experts.flatten()])
    assert sorted(ids.tolist()) == list(range(I))


def test_shared_are_highest_rate(ffn_and_stats):
    ffn, stats = ffn_and_stats
    split = split_neurons("random", ffn, stats, num_experts=8, shared=0.25, seed=0)
    rate = stats.activation_rate
    assert rate[split.shared].min() >= rate[split.experts.flatten()].max()


def test_coactivation_groups_neurons_that_fire_together():
    """Two planted blocks of neurons that always fire together must land in separate experts,
    each block whole."""
    stats = FFNStats("l", marker_share=0.5, coactivation=True, keep_inputs=0)
    h = torch.zeros(200, 16)
    h[:100, :8] = 1.0
    h[100:, 8:] = 1.0
    h += 0.01 * torch.rand(200, 16, generator=torch.Generator().manual_seed(0))
    stats.add_batch(torch.zeros(200, 4), h)
    ffn = DenseFFN("mlp", "relu", torch.randn(16, 4), None, None, torch.randn(16, 4), None)
    experts = split_neurons("coactivation", ffn, stats, num_experts=2, shared=0.0, seed=0).experts
    assert sorted(map(sorted, experts.tolist())) == [list(range(8)), list(range(8, 16))]


def test_param_kmeans_groups_similar_rows():
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    rows = base.repeat_interleave(4, 0) + 0.01 * torch.randn(16, 8)
    ffn = DenseFFN("mlp", "relu", rows, None, None, torch.randn(16, 8), None)
    stats = FFNStats("l", 0.25, False, 0)
    stats.add_batch(torch.randn(10, 8), torch.rand(10, 16))
    experts = split_neurons("param-kmeans", ffn, stats, num_experts=4, shared=0.0, seed=0).experts
    assert sorted(map(sorted, experts.tolist())) == [list(range(i, i + 4)) for i in range(0, 16, 4)]


def test_rebalance_reaches_equal_sizes():
    rng = np.random.default_rng(0)
    A = rng.random((30, 30))
    A = A + A.T
    labels = np.array([0] * 20 + [1] * 7 + [2] * 3)
    out = _rebalance(labels, A, 3)
    assert np.bincount(out).tolist() == [10, 10, 10]


@pytest.mark.parametrize("method", sorted(GROUPINGS))
def test_single_neuron_experts_skip_grouping(method, ffn_and_stats):
    """Experts of one neuron (--experts = FFN width): every method gives the routed neurons in order."""
    ffn, stats = ffn_and_stats
    split = split_neurons(method, ffn, stats, num_experts=I, shared=0.25, seed=0)
    assert split.experts.shape == (I - 16, 1)
    routed = split.experts.flatten()
    assert routed.tolist() == sorted(set(range(I)) - set(split.shared.tolist()))
