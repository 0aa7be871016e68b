import pytest
import torch

from moefy.arch import FAMILIES
from moefy.errors import NonFiniteActivations
from moefy.pipeline.stats import FFNStats
from moefy.pipeline.calibrate import capture, profile

from conftest import tiny_model


def test_stats_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(100, 8, generator=g), torch.randn(100, 12, generator=g)
    s = FFNStats("l", marker_share=0.25, coactivation=True, keep_inputs=60)
    for xb, hb in zip(x.split(33), h.split(33)):
        s.add_batch(xb, hb)
    assert s.tokens == 100
    torch.testing.assert_close(s.abs_sum, h.abs().sum(0).double())
    torch.testing.assert_close(s.sq_sum, h.square().sum(0).double())
    markers = torch.zeros_like(h).scatter_(1, h.abs().topk(3, dim=1).indices, 1.0)
    torch.testing.assert_close(s.activation_rate, markers.mean(0).double())
    torch.testing.assert_close(s.coactivation, markers.T @ markers)
    torch.testing.assert_close(s.inputs, x[:60])


def test_non_finite_names_the_layer():
    s = FFNStats("layer 7", 0.25, False, 0)
    h = torch.zeros(4, 6)
    h[1, 2] = float("nan")
    with pytest.raises(NonFiniteActivations, match="layer 7"):
        s.add_batch(torch.zeros(4, 3), h)


def test_hooks_capture_every_layer_and_are_removed(model_type):
    model = tiny_model(model_type)
    family = FAMILIES[model_type]
    ids = torch.randint(5, 300, (3, 16))
    stats = profile(model, family, ids, batch_size=2, marker_share=0.25, coactivation=False,
                    keep_inputs=1000, progress=False)
    assert [s.tokens for s in stats] == [48, 48]
    assert stats[0].inputs.shape == (48, model.config.hidden_size)
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0
    # Hooks are removed even when the forward pass fails.
    with pytest.raises(RuntimeError):
        with capture(model, family, stats):
            raise RuntimeError("boom")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
