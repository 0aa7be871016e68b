"""Pruning correctness on synthetic layers: exact density, N:M pattern, SparseGPT's reconstruction."""

import pytest
import torch

from moefy.errors import ConfigError
from moefy.expansion.pruning import InputStats, PruneConfig, magnitude, nm_mask, parse_nm, prune, pruned_count, reconstruction_error, sparsegpt, wanda


def correlated_layer(rows=96, cols=256, tokens=2048, seed=0):
    """A layer whose inputs are strongly correlated and of uneven scale, as in transformers."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.1 * torch.randn(tokens, cols, generator=g))
    x = x * (0.2 + 3 * torch.rand(cols, generator=g))
    w = torch.randn(rows, cols, generator=g)
    stats = InputStats(cols)
    for chunk in x.split(500):
        stats.add_batch(chunk)
    return w, x, stats


@pytest.fixture(scope="module")
def layer():
    return correlated_layer()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_density_is_exact(layer, method, sparsity):
    w, _, stats = layer
    pruned = prune(w, stats, PruneConfig(method, sparsity))
    zeros = int((pruned == 0).sum())
    if method == "wanda":  # per output row
        assert ((pruned == 0).sum(1) == pruned_count(w.shape[1], sparsity)).all()
    else:
        assert zeros == pruned_count(w.numel(), sparsity)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds(layer, method, n, m):
    w, _, stats = layer
    pruned = prune(w, stats, PruneConfig(method, nm=(n, m)))
    per_group = (pruned != 0).reshape(w.shape[0], -1, m).sum(-1)
    assert (per_group == n).all()


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(layer):
    w, x, stats = layer
    for cfg in (dict(sparsity=0.5), dict(sparsity=0.7), dict(nm=(2, 4))):
        err = {m: reconstruction_error(w, prune(w, stats, PruneConfig(m, **cfg)), x)
               for m in ("sparsegpt", "wanda", "magnitude")}
        assert err["sparsegpt"] < err["wanda"] < err["magnitude"], (cfg, err)


def test_sparsegpt_at_zero_sparsity_keeps_the_layer(layer):
    w, x, stats = layer
    torch.testing.assert_close(sparsegpt(w, stats.hessian(), 0.0), w)


def test_sparsegpt_survives_dead_inputs_and_few_tokens():
    w, x, _ = correlated_layer(rows=32, cols=128, tokens=40)
    x[:, :5] = 0  # inputs that never fire
    stats = InputStats(128)
    stats.add_batch(x)
    pruned = sparsegpt(w, stats.hessian(), 0.5)
    assert torch.isfinite(pruned).all() and (pruned[:, :5] == 0).all()


def test_wanda_and_magnitude_definitions():
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0]])
    assert magnitude(w, 0.5).tolist() == [[0.0, -4.0, 0.0, 3.0]]
    norms = torch.tensor([10.0, 0.1, 1.0, 1.0])  # |W| x ||x||: 10, 0.4, 2, 3
    assert wanda(w, norms, 0.5).tolist() == [[1.0, 0.0, 0.0, 3.0]]
    assert nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4).tolist() == [[False, True, False, True]]


def test_input_stats_match_the_definitions(layer):
    _, x, stats = layer
    x64 = x.double()
    torch.testing.assert_close(stats.hessian(), (2 * x64.T @ x64 / x.shape[0]).float(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.sq_norms, x64.square().sum(0))


@pytest.mark.parametrize("kw,message", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(method="obs"), "unknown pruning"),
    (dict(nm=(4, 4)), "N:M"), (dict(nm=(2, 3)), "divide"),
])
def test_bad_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**kw).validate()


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(None) is None
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(ConfigError):
            parse_nm(bad)
