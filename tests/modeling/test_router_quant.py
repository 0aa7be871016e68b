"""The quantised router: a 4-bit copy of gate and up ranks the experts; the kernel and the torch
path compute the same estimate; the layer's fast paths compute exactly the selected experts; the
cost counts the copy's bytes; the copy is saved."""

import pytest
import torch

from moefy.arch import DenseFFN
from moefy.modeling import compiled
from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN
from moefy.modeling.router_quant import GROUP, dequantize, quantize

D, I = 64, 96


def layer(kind="swiglu", bias=False, n=1, top_k=20, approx=0.0, threshold=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    f = DenseFFN(kind, "silu" if kind == "swiglu" else "gelu_tanh", r(I, D), r(I, D) if kind == "swiglu" else None,
                 r(I) if bias else None, r(I, D) / 5, r(D) if bias else None)
    moe = MoEFFN.from_dense(f, torch.zeros(0, dtype=torch.long), torch.arange(I).view(-1, n),
                            {"kind": "quant", "options": {"approx": approx, "threshold": threshold}}, top_k=top_k)
    moe.router.quantize_weights()
    return f, moe


def test_quantize_round_trip():
    w = torch.randn(40, 128)
    q, s = quantize(w)
    assert q.dtype == torch.uint8 and q.shape == (40, 64) and s.shape == (40, 128 // GROUP)
    err = dequantize(q, s) - w
    assert (err.abs() <= s.repeat_interleave(GROUP, 1) / 2 + 1e-6).all()  # half a step at most
    assert torch.equal(quantize(dequantize(q, s))[0], q)


@pytest.mark.parametrize("kind,bias", [("swiglu", False), ("mlp", True)])
def test_kernel_estimate_matches_the_dequantised_copy(kind, bias):
    kern = compiled._kernels()
    if kern is None:
        pytest.skip("no compiled kernels here")
    _, moe = layer(kind, bias)
    r = moe.router
    x = torch.randn(5, D)
    with torch.no_grad():
        h = kern.q4_hidden(x, r.q_in, r.s_in, r.q_up, r.s_up, None if moe.b_in is None else moe.b_in.reshape(-1), moe.act)
        g = x @ dequantize(r.q_in, r.s_in).T + (0 if moe.b_in is None else moe.b_in.reshape(-1))
        ref = ACTIVATIONS[moe.act](g) * (x @ dequantize(r.q_up, r.s_up).T if r.q_up is not None else 1)
    assert float((h - ref).norm() / ref.norm()) < 0.03  # x is rounded to int8 in the kernel


@pytest.mark.parametrize("approx,threshold", [(0.0, False), (0.3, False), (0.3, True)])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_path_computes_the_selected_experts(approx, threshold, use_kernels, monkeypatch):
    if use_kernels and compiled._kernels() is None:
        pytest.skip("no compiled kernels here")
    if not use_kernels:
        monkeypatch.setattr(compiled, "_KERNELS", None)
    _, moe = layer(approx=approx, threshold=threshold)
    if threshold:
        moe.fit_score_quantiles(torch.randn(256, D))
    with torch.no_grad():
        for t in range(4):
            x = torch.randn(1, D)
            torch.testing.assert_close(moe(x), _reference(moe, x), atol=1e-4, rtol=1e-4)



def _reference(moe, x):
    """The selected experts exactly plus the sketched ones through their down rows (torch)."""
    scores, h = moe.router.norms(x, None, hidden=True)
    if moe.thresholded:
        exact, sketched = moe._threshold_masks(scores)
    else:
        top = scores.topk(moe.top_k + moe.approx_k, dim=-1).indices
        exact = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top[:, :moe.top_k], True)
        sketched = torch.zeros_like(exact).scatter_(1, top[:, moe.top_k:], True)
    y = moe.forward_reference(x, exact)
    return y if sketched is None else y + (h[0] * sketched[0, :, None]).flatten() @ moe.w_out.flatten(0, 1)


def test_bound_decode_call_follows_every_change():
    """The fused call binds its arguments once (MoEFFN._quant_step): a new selection, approx
    share, thresholds or down rows changed in place must reach the next call."""
    if compiled._kernels() is None:
        pytest.skip("no compiled kernels here")
    _, moe = layer(approx=0.3)
    x = torch.randn(1, D)
    with torch.no_grad():
        changes = [lambda: moe.set_selection(9, None), lambda: moe.set_router_approx(0.1),
                   lambda: (moe.fit_score_quantiles(torch.randn(256, D)), moe.set_router_threshold(True)),
                   lambda: moe.w_out[: I // 2].mul_(3.0)]
        for change in changes:
            moe(x)
            change()
            torch.testing.assert_close(moe(x), _reference(moe, x), atol=1e-4, rtol=1e-4)

def test_every_expert_is_the_dense_ffn():
    f, moe = layer(top_k=I)
    x = torch.randn(3, D)
    dense = (ACTIVATIONS[f.act](x @ f.w_in.T) * (x @ f.w_up.T)) @ f.w_out
    with torch.no_grad():
        torch.testing.assert_close(moe(x[:1]), dense[:1], atol=1e-4, rtol=1e-4)
        moe.all_experts = True
        torch.testing.assert_close(moe(x), dense, atol=1e-4, rtol=1e-4)


def test_cost_counts_the_copy_bytes_and_the_selected_rows():
    _, moe = layer(top_k=24)
    cost = moe.decode_cost(mean_k=24, mean_sketched=0)
    copy = 2 * I * (D / 2 + 4 * D / GROUP) + 4 * I  # codes and scales of gate and up, the down norms
    assert cost["router_bytes"] == pytest.approx(copy)
    assert cost["bytes"] == pytest.approx(copy + 24 * 3 * D * 4)
    assert cost["dense_bytes"] == 3 * I * D * 4
    assert cost["router_bytes"] / cost["dense_bytes"] < 0.11  # 4.5 bits of 2 of 3 fp32 matrices
    # the budget counts the copy as the fp32 bytes it stands for: k fits what is left of the share
    router_flops = 2 * copy / 4 + 2 * I  # fp32 weight-equivalents, and the scores
    assert moe.top_k_for_share(0.5) == int((0.5 * 2 * 3 * I * D - router_flops) // (2 * 3 * D))


def test_a_hidden_size_off_the_group_is_refused():
    with pytest.raises(ValueError, match="divisible by 32"):
        MoEFFN.from_dense(DenseFFN("swiglu", "silu", torch.randn(8, 40), torch.randn(8, 40), None,
                                   torch.randn(8, 40), None), torch.zeros(0, dtype=torch.long),
                          torch.arange(8).view(-1, 1), {"kind": "quant"})
