import pytest
import torch

from moefy.modeling import compiled
from moefy.arch import DenseFFN
from moefy.modeling.activations import ACTIVATIONS
from moefy.modeling.moe_layer import MoEFFN
from moefy.modeling.selection import select_experts

D, I = 24, 48


def dense_ffn(kind, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return DenseFFN(kind, "silu" if kind == "swiglu" else "gelu_tanh", r(I, D), r(I, D) if kind == "swiglu" else None,
                    r(I) if bias else None, r(I, D) / 5, r(D) if bias else None)


def dense_forward(f: DenseFFN, x):
    h = ACTIVATIONS[f.act](x @ f.w_in.T + (0 if f.b_in is None else f.b_in))
    if f.w_up is not None:
        h = h * (x @ f.w_up.T)
    return h @ f.w_out + (0 if f.b_out is None else f.b_out)


def make_moe(kind="swiglu", bias=False, shared=0, E=None, router="mlp", top_k=2, tau=None, **options):
    f = dense_ffn(kind, bias)
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(1))
    E = E or (I - shared) // 6
    moe = MoEFFN.from_dense(f, perm[:shared].sort().values, perm[shared:].view(E, -1),
                            {"kind": router, "options": options}, top_k=top_k, tau=tau)
    torch.nn.init.normal_(moe.router.fc1.weight) if router == "mlp" else None
    return f, moe


CASES = [("swiglu", False, 0), ("swiglu", False, 12), ("mlp", True, 0), ("mlp", True, 6)]


@pytest.fixture(params=["torch", "kernels"])
def path(request, monkeypatch):
    """Run a test on the torch paths and on the compiled kernels (inference mode: no autograd)."""
    if request.param == "kernels" and compiled._kernels() is None:
        pytest.skip("moefy.kernels could not be built here (no C++ compiler)")
    if request.param == "torch":
        monkeypatch.setattr(compiled, "_KERNELS", None)
    with torch.no_grad():
        yield request.param


def selection(moe, x):
    """The experts the layer will use for x, by the same rule as its forward: the kernels rank
    scores in C++ (ties may break differently from torch.topk)."""
    x = x.reshape(-1, x.shape[-1])
    kern = compiled._kernels()
    if kern is None or torch.is_grad_enabled() or moe.tau is not None:
        return moe.route(x)
    if moe._mlp_router and len(x) <= compiled.KERNEL_FUSED_MAX_TOKENS:
        idx = kern.mlp_topk(moe._kernel_args(kern), x, moe.top_k)
    else:
        idx = kern.topk(moe._rank_scores(x), moe.top_k)
    return torch.zeros(len(x), moe.spec["num_experts"], dtype=torch.bool).scatter_(1, idx, True)


@pytest.mark.parametrize("kind,bias,shared", CASES)
def test_all_experts_equals_dense(kind, bias, shared, path):
    f, moe = make_moe(kind, bias, shared)
    x = torch.randn(7, D)
    expected = dense_forward(f, x)
    moe.all_experts = True
    torch.testing.assert_close(moe(x), expected, atol=1e-4, rtol=1e-4)
    # ... and selecting every expert through the router path gives the same.
    moe.all_experts, moe.top_k = False, moe.spec["num_experts"]
    torch.testing.assert_close(moe(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moe(x[:1]), expected[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("tau", [None, 0.5])
@pytest.mark.parametrize("router", ["mlp", "similarity", "representative", "sketch"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fast_paths_match_reference(kind, bias, shared, tau, router, threads, path):
    _, moe = make_moe(kind, bias, shared, tau=tau, router=router)
    if router != "mlp":
        for p in moe.router.parameters():
            torch.nn.init.normal_(p)
    x = torch.randn(4, 5, D)  # 20 tokens: past the fused kernel's limit
    expected = moe.forward_reference(x, selection(moe, x))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Outputs reach ~100 with these random weights: a few fp32 ulps of summation order.
        torch.testing.assert_close(moe(x), expected, atol=1e-4, rtol=1e-5)  # many tokens (grouped)
        for t in range(5):  # one token at a time: the decode path
            one = x[:1, t:t + 1]
            torch.testing.assert_close(moe(one), moe.forward_reference(one, selection(moe, one)), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_kernel_router_ranks_like_torch(path):
    if path == "torch":
        pytest.skip("kernel-only")
    _, moe = make_moe(E=8, top_k=3)
    x = torch.randn(20, D)
    kern = compiled._kernels()
    idx = kern.mlp_topk(moe._kernel_args(kern), x, 3)
    assert idx.sort(1).values.tolist() == moe.router(x).topk(3, dim=-1).indices.sort(1).values.tolist()


@pytest.mark.parametrize("kind,shared", [("swiglu", 10), ("mlp", 0)])
def test_kernels_on_wide_layers(kind, shared, path):
    """Hidden sizes past the kernels' 64-column register blocks, with a ragged tail."""
    g = torch.Generator().manual_seed(2)
    d, i = 136, 90
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    f = DenseFFN(kind, "silu" if kind == "swiglu" else "gelu", r(i, d), r(i, d) if kind == "swiglu" else None,
                 None if kind == "swiglu" else r(i), r(i, d) / 5, None)
    moe = MoEFFN.from_dense(f, torch.arange(shared), torch.arange(shared, i).view(-1, 4 if shared else 5),
                            {"kind": "similarity"}, top_k=3)
    torch.nn.init.normal_(moe.router.centres)
    x = torch.randn(6, d, generator=g)
    for tokens in (x, x[:1]):
        torch.testing.assert_close(moe(tokens), moe.forward_reference(tokens), atol=1e-4, rtol=1e-5)


def test_moe_output_differs_from_dense_when_sparse():
    f, moe = make_moe(top_k=1)
    x = torch.randn(16, D)
    assert not torch.allclose(moe(x), dense_forward(f, x), atol=1e-3)


@pytest.mark.parametrize("tau", [None, 0.5])
def test_only_selected_experts_are_read(tau, path):
    """Poisoning the weights of experts no token selected must not change any output."""
    _, moe = make_moe(top_k=2, tau=tau)
    x = torch.randn(4, D)
    mask = selection(moe, x)
    before = moe(x)
    unused = ~mask.any(0)
    assert unused.any()
    with torch.no_grad():
        moe.w_in[unused] = float("nan")
        moe.w_out[unused] = float("nan")
    torch.testing.assert_close(moe(x), before)
    torch.testing.assert_close(moe(x[:1]), before[:1])


def test_select_experts_top_k_and_dynamic_k():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.85], [1.0, 0.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -0.5]])
    assert select_experts(scores, 2, None).sum(1).tolist() == [2, 2, 2]
    mask = select_experts(scores, None, 0.2)  # keep s >= 0.8 max
    assert mask.tolist() == [[False, True, False, True], [True, False, False, False], [False, False, False, True]]
    assert select_experts(scores, None, 0.0).sum(1).tolist() == [1, 1, 1]
    assert select_experts(scores, 1, 0.2).sum(1).tolist() == [1, 1, 1]  # top_k caps dynamic-k


def test_top_k_for_share_respects_budget():
    _, moe = make_moe(E=8, router="similarity")
    for active in (0.25, 0.5, 1.0):
        k = moe.top_k_for_share(active)
        assert moe.flops_per_token(k) <= active * moe.dense_flops_per_token() or k == 8
        if k < 8:
            assert moe.flops_per_token(k + 1) > active * moe.dense_flops_per_token()


def test_counters_measure_mean_k(path):
    _, moe = make_moe(tau=0.3)
    x = torch.randn(10, D)
    mask = moe.route(x)
    moe.reset_counters()
    moe(x)
    assert moe.tokens_seen == 10
    assert moe.mean_k() == pytest.approx(mask.sum().item() / 10)


@pytest.mark.parametrize("kind,bias,shared", CASES)
def test_expert_norms_match_outputs(kind, bias, shared):
    _, moe = make_moe(kind, bias, shared)
    x = torch.randn(9, D)
    expected = moe.expert_outputs(x).norm(dim=-1).T
    torch.testing.assert_close(moe.expert_norms(x, chunk=4), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 20])
def test_routing_step_selects_what_forward_uses(tokens, path):
    _, moe = make_moe()
    x = torch.randn(tokens, D)
    step = moe.routing_step(x)
    if step.dtype != torch.bool:  # kernel paths return indices [T, K]
        step = torch.zeros(tokens, moe.spec["num_experts"], dtype=torch.bool).scatter_(1, step, True)
    assert torch.equal(step, selection(moe, x))


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("E", [None, 48])
def test_sketch_router_reading_every_channel_scores_true_norms(kind, bias, shared, E, path):
    _, moe = make_moe(kind, bias, shared, E=E and I - shared, router="sketch", channels=1.0)
    x = torch.randn(9, D)
    torch.testing.assert_close(moe.router(x), moe.expert_norms(x), atol=1e-4, rtol=1e-4)
    for t in range(3):  # the decode path (transposed weights, kept rows only) scores the same
        torch.testing.assert_close(moe.router(x[t:t + 1]), moe.expert_norms(x[t:t + 1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,bias,shared", CASES)
def test_sketch_router_reads_only_the_largest_input_channels(kind, bias, shared, path):
    _, moe = make_moe(kind, bias, shared, router="sketch", channels=0.25)
    assert moe.router.kept == 6  # of D = 24
    x = torch.randn(5, D)
    kept = x.abs().topk(6, dim=-1).indices
    sparse = torch.zeros_like(x).scatter_(-1, kept, x.gather(-1, kept))
    torch.testing.assert_close(moe.router(x), moe.expert_norms(sparse), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(moe.router(x[2:3]), moe.expert_norms(sparse[2:3]), atol=1e-4, rtol=1e-4)
    # Its cost: the kept channels of every routed neuron's gate (and up), then h^T G h per expert.
    E, n, _ = moe.w_in.shape
    input_matrices = 2 if kind == "swiglu" else 1
    assert moe.router.flops_per_token() == 2 * 6 * E * n * input_matrices + 2 * E * n * n


def test_sketch_router_follows_weight_changes(path):
    """The router has no weights of its own: tuning the experts (in place) changes its scores."""
    _, moe = make_moe(router="sketch", channels=0.5)
    x = torch.randn(3, D)
    for rows in (x, x[:1]):
        before = moe.router(rows)
        with torch.no_grad():
            moe.w_in.mul_(-1.5)
        after = moe.router(rows)
        assert not torch.allclose(before, after)
        fresh = MoEFFN(moe.spec)
        fresh.load_state_dict(moe.state_dict())
        torch.testing.assert_close(after, fresh.router(rows))
    assert list(moe.router.parameters()) == [] and list(moe.router.buffers()) == []


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("tau", [None, 0.5])
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("threads", [1, 2])
def test_sketch_reuse_matches_reference(kind, bias, shared, tau, n, threads, path):
    """Completing the sketch's partial sums gives the selected experts' exact outputs."""
    _, moe = make_moe(kind, bias, shared, E=(I - shared) // n, tau=tau, router="sketch", channels=0.25, reuse=True)
    x = torch.randn(4, 5, D)  # 20 tokens: the many-token sketch (one GEMM) feeds the kernel
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(moe(x), moe.forward_reference(x, selection(moe, x)), atol=1e-4, rtol=1e-5)
        for t in range(5):  # few tokens: the sketch kernel's sums
            rows = x[0, t:t + 1 + t % 3]
            torch.testing.assert_close(moe(rows), moe.forward_reference(rows, selection(moe, rows)),
                                       atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind,bias", [("swiglu", False), ("mlp", True)])
def test_sketch_reuse_kernel_adds_only_the_channels_left(kind, bias, path):
    """The kernel starts each selected neuron from the sketch's sums and adds the other channels
    only: given zero sums, it computes the experts on the input with the kept channels zeroed.
    Wide rows cover the kernels' tails."""
    if path == "torch":
        pytest.skip("kernel-only")
    g = torch.Generator().manual_seed(3)
    d, i = 75, 40
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    f = DenseFFN(kind, "silu" if kind == "swiglu" else "gelu", r(i, d), r(i, d) if kind == "swiglu" else None,
                 r(i) if bias else None, r(i, d) / 5, None)
    moe = MoEFFN.from_dense(f, torch.arange(0), torch.arange(i).view(-1, 2),
                            {"kind": "sketch", "options": {"channels": 0.3, "reuse": True}}, top_k=5)
    kern = compiled._kernels()
    for tokens in (1, 3, 20):
        x = torch.randn(tokens, d, generator=g)
        mask = selection(moe, x)
        _, (kept, gp, upp) = moe.router.norms(x, moe.router.kept, partials=True)
        assert kept.shape == (tokens, 22)  # 0.3 x 75
        experts = mask.nonzero()[:, 1].view(tokens, -1).contiguous()
        args = moe._kernel_args(kern)
        y = kern.sketch_experts(args, x, kept, gp, upp, experts)
        torch.testing.assert_close(y, moe.forward_reference(x, mask), atol=1e-4, rtol=1e-5)
        rest = x.scatter(1, kept, 0.0)
        zero = kern.sketch_experts(args, x, kept, torch.zeros_like(gp), None if upp is None else torch.zeros_like(upp),
                                   experts)
        torch.testing.assert_close(zero, moe.forward_reference(rest, mask), atol=1e-4, rtol=1e-5)


def test_sketch_reuse_counts_fewer_flops_per_neuron():
    _, plain = make_moe(router="sketch", channels=0.25, E=48)
    _, reuse = make_moe(router="sketch", channels=0.25, E=48, reuse=True)
    assert plain.router.flops_per_token() == reuse.router.flops_per_token()
    # gate and up of a selected neuron read only the 18 channels the sketch left (of D = 24); down reads all
    assert reuse.flops_per_token(10) == reuse.router.flops_per_token() + 10 * 2 * (18 + 18 + 24)
    assert plain.flops_per_token(10) == plain.router.flops_per_token() + 10 * 2 * 3 * 24
    assert reuse.top_k_for_share(0.5) > plain.top_k_for_share(0.5)
    plain.set_router_reuse(True)
    assert plain.flops_per_token(10) == reuse.flops_per_token(10) and plain.spec["router"]["options"]["reuse"]
    fresh = MoEFFN(plain.spec)
    assert fresh.router.reuse and fresh._sketch_reuse
    _, mlp = make_moe()
    with pytest.raises(ValueError, match="sketch"):
        mlp.set_router_reuse(True)


def sketched_reference(moe, x):
    """The approx path's output by plain means: the exact top_k experts (forward_reference), plus
    the next approx_k experts' outputs computed on the input with all but the kept channels zeroed."""
    scores = moe.router(x)
    top = scores.topk(moe.top_k + moe.approx_k, dim=-1).indices
    exact = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top[:, :moe.top_k], True)
    kept = x.abs().topk(moe.router.kept, dim=-1).indices
    masked = torch.zeros_like(x).scatter_(-1, kept, x.gather(-1, kept))
    outs = moe.expert_outputs(masked)  # [E, T, D]
    extra = torch.stack([outs[top[t, moe.top_k:], t].sum(0) for t in range(len(x))])
    return moe.forward_reference(x, exact) + extra, exact


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("reuse", [False, True])
def test_sketch_approx_matches_reference(kind, bias, shared, n, reuse, path):
    """Sketched experts: the experts ranked after the top_k add their sketched activations through
    their down rows, on every path (torch, kernels; one token, few, many)."""
    _, moe = make_moe(kind, bias, shared, E=(I - shared) // n, top_k=2, router="sketch", channels=0.25,
                      reuse=reuse, approx=0.3)
    assert moe.approx_k > 0 and moe.top_k + moe.approx_k <= moe.spec["num_experts"]
    x = torch.randn(20, D)
    for rows in (x, x[:1], x[3:6]):
        expected, _ = sketched_reference(moe, rows)
        torch.testing.assert_close(moe(rows), expected, atol=1e-4, rtol=1e-5)
    assert moe.mean_k() == moe.top_k  # the counters count the exact experts; their FLOPs add the sketched ones


def test_sketch_approx_trains_through_the_sketched_experts():
    """The training path gives the same output, and its gradients reach the sketched experts' rows."""
    _, moe = make_moe(router="sketch", E=48, top_k=4, channels=0.25, reuse=True, approx=0.3)
    x = torch.randn(6, D)
    with torch.no_grad():
        expected, exact = sketched_reference(moe, x)
    y = moe(x)  # the weights require grad: the masked training path
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    y.square().sum().backward()
    touched = moe.w_out.grad.flatten(1).abs().sum(1) > 0
    assert (touched & ~exact.any(0)).any()  # some rows had only sketched use, and learned
    assert moe.w_in.grad.abs().sum() > 0


def test_sketch_approx_splits_the_budget():
    _, plain = make_moe(router="sketch", channels=0.25, E=48, reuse=True)
    _, approx = make_moe(router="sketch", channels=0.25, E=48, reuse=True, approx=0.3)
    dense = plain.dense_flops_per_token()
    k0, k = plain.top_k_for_share(0.5), approx.top_k_for_share(0.5)
    approx.set_selection(k, None)
    assert k < k0 and approx.approx_k > k0 - k  # a sketched expert costs its down rows only: more of them fit
    assert approx.flops_per_token(k) <= 0.5 * dense
    # 2 D n FLOPs each, on top of the exact experts' cost
    assert approx.flops_per_token(k) == approx.router.flops_per_token() + k * 2 * (18 + 18 + 24) + approx.approx_k * 2 * 24
    fresh = MoEFFN(approx.spec)  # kept in the spec that is saved
    assert fresh.approx_k == approx.approx_k and fresh.router.approx == 0.3
    approx.set_selection(k, 0.5)  # dynamic-k: no sketched experts
    assert approx.approx_k == 0
    plain.set_router_approx(0.3)
    assert plain.top_k_for_share(0.5) == k and plain.spec["router"]["options"]["approx"] == 0.3
    with pytest.raises(ValueError, match="own input"):
        plain.set_router_input("previous")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        plain.set_router_approx(1.0)
    _, mlp = make_moe()
    with pytest.raises(ValueError, match="sketch"):
        mlp.set_router_approx(0.2)


def thresholded_moe(kind="swiglu", bias=False, shared=0, n=1, reuse=True, approx=0.3, top_k=None):
    """A sketch-router layer with score thresholds fitted on 400 random calibration tokens."""
    E = (I - shared) // n
    _, moe = make_moe(kind, bias, shared, E=E, top_k=top_k or max(1, E // 4), router="sketch", channels=0.25,
                      reuse=reuse, approx=approx, threshold=True)
    calib = torch.randn(400, D, generator=torch.Generator().manual_seed(7))
    moe.fit_score_quantiles(calib)
    return moe.requires_grad_(False), calib


def threshold_reference(moe, x):
    """The thresholded layer by plain means: the experts scoring >= t_exact computed exactly
    (forward_reference), plus those in [t_sketched, t_exact) on the input with all but the kept
    channels zeroed."""
    scores = moe.router(x)
    t1, t2 = moe.thresholds()
    exact = scores >= t1
    sketched = (scores >= t2) & ~exact
    kept = x.abs().topk(moe.router.kept, dim=-1).indices
    masked = torch.zeros_like(x).scatter_(-1, kept, x.gather(-1, kept))
    outs = moe.expert_outputs(masked)  # [E, T, D]
    extra = torch.stack([outs[sketched[t], t].sum(0) for t in range(len(x))])
    return moe.forward_reference(x, exact) + extra, exact, sketched


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("approx", [0.0, 0.3])
def test_sketch_threshold_matches_reference(kind, bias, shared, n, reuse, approx, path):
    """Score thresholds: each token takes the experts above them, a number of its own, on every
    path (torch, kernels; one token, few, many); the counters count what was computed."""
    moe, _ = thresholded_moe(kind, bias, shared, n, reuse, approx)
    assert moe.thresholded
    x = torch.randn(20, D)
    for rows in (x, x[:1], x[3:6]):
        expected, exact, sketched = threshold_reference(moe, rows)
        moe.reset_counters()
        torch.testing.assert_close(moe(rows), expected, atol=1e-4, rtol=1e-5)
        assert moe.experts_selected == exact.sum() and moe.sketched_selected == sketched.sum()
    counts = threshold_reference(moe, x)[1].sum(1)
    assert counts.min() < counts.max()  # the count follows the token


def test_sketch_threshold_keeps_the_budget_on_calibration_text():
    """The thresholds are the score quantiles at the top-k's mean counts: on the text they were
    fitted on, the mean counts are the top-k's and approx_k's, so the FLOPs are the budget's."""
    for approx in (0.0, 0.3):
        moe, calib = thresholded_moe(approx=approx, top_k=10)
        moe.reset_counters()
        moe(calib)
        assert moe.mean_k() == pytest.approx(moe.top_k, rel=0.02)
        assert moe.mean_sketched() == pytest.approx(moe.approx_k, rel=0.02, abs=0.05)
        assert moe.flops_per_token(moe.mean_k(), moe.mean_sketched()) == pytest.approx(
            moe.flops_per_token(moe.top_k), rel=0.02)
        moe.set_selection(20, None)  # a new budget moves the thresholds: no refit needed
        moe.reset_counters()
        moe(calib)
        assert moe.mean_k() == pytest.approx(20, rel=0.02)


def test_sketch_threshold_state_and_switches():
    moe, calib = thresholded_moe(top_k=10)
    fresh = MoEFFN(moe.spec).requires_grad_(False)  # the grid is in the spec, the quantiles in the state dict
    fresh.load_state_dict(moe.state_dict())  # (no grad: the same inference path as moe, not the training one)
    assert fresh.thresholded and fresh.thresholds() == moe.thresholds()
    x = torch.randn(5, D)
    torch.testing.assert_close(fresh(x), moe(x))
    # between two channel counts of the grid the thresholds lie between theirs
    grid = moe.router.grid
    assert moe.router.kept in grid and all(c in grid for c in (1, 5, 24))  # 0.05, 0.2, 1.0 of D = 24
    moe.set_router_channels(0.3)  # 7 channels: between 6 (0.25) and 8 (0.35)
    t = moe.thresholds()[0]
    bounds = []
    for share in (0.25, 0.35):
        moe.set_router_channels(share)
        bounds.append(moe.thresholds()[0])
    assert min(bounds) <= t <= max(bounds)
    moe.set_router_threshold(False)  # back to the same top-k for every token
    assert not moe.thresholded and moe.spec["router"]["options"]["threshold"] is False
    moe.set_router_threshold(True)
    moe.set_selection(None, 0.5)  # dynamic-k replaces the thresholds
    assert not moe.thresholded
    _, plain = make_moe(router="sketch", channels=0.25, E=48, top_k=4)
    with pytest.raises(ValueError, match="no score quantiles"):
        plain.set_router_threshold(True)
    _, mlp = make_moe()
    with pytest.raises(ValueError, match="sketch"):
        mlp.set_router_threshold(True)
    with pytest.raises(ValueError, match="sketch"):
        mlp.fit_score_quantiles(calib)


def test_sketch_threshold_trains_like_inference():
    """The training path selects by the same thresholds, and its gradients reach the experts."""
    moe, _ = thresholded_moe(top_k=10)
    x = torch.randn(6, D)
    with torch.no_grad():
        expected, _, _ = threshold_reference(moe, x)
    moe.requires_grad_(True)
    y = moe(x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
    y.square().sum().backward()
    assert moe.w_in.grad.abs().sum() > 0 and moe.w_out.grad.abs().sum() > 0


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("mode", ["top-k", "tau", "approx", "threshold", "threshold-approx"])
def test_sketch_gemm_path_matches_reference(kind, bias, shared, n, mode, path):
    """From SKETCH_GEMM_MIN_TOKENS tokens on, a sketch layer on the torch paths runs as GEMMs
    (every routed neuron computed, the selection masked into the down product; the kernels take
    the same tokens themselves): the same outputs and counts as the plain references, with reuse
    or without."""
    T = compiled.SKETCH_GEMM_MIN_TOKENS + 6
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(11))
    for reuse in (False, True):
        if mode.startswith("threshold"):
            moe, _ = thresholded_moe(kind, bias, shared, n, reuse, 0.3 if mode.endswith("approx") else 0.0)
            expected, exact, sketched = threshold_reference(moe, x)
        else:
            _, moe = make_moe(kind, bias, shared, E=(I - shared) // n, top_k=2, router="sketch", channels=0.25,
                              reuse=reuse, approx=0.3 if mode == "approx" else 0.0,
                              tau=0.5 if mode == "tau" else None)
            if mode == "approx":
                expected, exact = sketched_reference(moe, x)
            else:
                exact = moe.route(x)
                expected = moe.forward_reference(x, exact)
            sketched = torch.zeros_like(exact) if mode != "approx" else None
        moe.reset_counters()
        torch.testing.assert_close(moe(x), expected, atol=1e-4, rtol=1e-5)
        assert moe.experts_selected == exact.sum()
        assert moe.sketched_selected == (T * moe.approx_k if sketched is None else sketched.sum())


def test_sketch_gemm_path_passes_gradients_to_its_input():
    """A frozen sketch layer inside a model whose other parts train: its input's gradient is the
    reference's (the masks carry none; the exact and sketched activations do)."""
    moe, _ = thresholded_moe()
    x = torch.randn(compiled.SKETCH_GEMM_MIN_TOKENS + 2, D, requires_grad=True)
    moe(x).square().sum().backward()  # inputs with gradients: the torch paths, as GEMMs here
    ref = x.detach().clone().requires_grad_(True)
    threshold_reference(moe, ref)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-3, rtol=1e-4)


def pruned_moe(kind="swiglu", bias=False, shared=0, n=1, approx=0.3, threshold=False, sparsity=0.5, top_k=None,
               reuse=False):
    """A sketch-router layer whose sketch reads pruned weights, calibrated on 400 random tokens
    whose channels have different scales (so the channel norms matter to the pruning)."""
    E = (I - shared) // n
    _, moe = make_moe(kind, bias, shared, E=E, top_k=top_k or max(1, E // 4), router="sketch", channels=0.5,
                      approx=approx, threshold=threshold, sparsity=sparsity, reuse=reuse)
    g = torch.Generator().manual_seed(7)
    calib = torch.randn(400, D, generator=g) * torch.rand(D, generator=g).mul(3).add(0.1)
    moe.fit_sketch_sparsity(calib)
    if threshold:
        moe.fit_score_quantiles(calib)
    return moe.requires_grad_(False), calib


def pruned_copy(moe):
    """The same layer with its gate and up weights pruned as the sketch prunes them (every row keeps
    its largest |w_ij| x ||x_j||) and an unpruned sketch: what the pruned sketch must score like."""
    E, n, D_ = moe.w_in.shape
    keep = D_ - round(moe.router.sparsity * D_)
    copy = MoEFFN({**moe.spec, "router": {"kind": "sketch", "options": {"channels": moe.router.channels}}})
    copy.load_state_dict(moe.state_dict(), strict=False)
    with torch.no_grad():
        for w in (copy.w_in, copy.w_up):
            if w is None:
                continue
            flat = w.view(E * n, D_)
            score = flat.abs() * moe.router.channel_norms
            flat.mul_(torch.zeros_like(flat).scatter_(1, score.topk(keep, dim=1).indices, 1.0))
    return copy


@pytest.mark.parametrize("kind,bias,shared", CASES)
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("threshold", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
def test_pruned_sketch_matches_reference(kind, bias, shared, n, threshold, reuse, path):
    """--router-sparsity: the sketch scores (and estimates the sketched experts) with the pruned
    weights, the exact experts use the full ones, on every path (torch, kernels; one token, few,
    many), with reuse (counted only: no path completes a pruned sketch's sums) or without."""
    moe, _ = pruned_moe(kind, bias, shared, n, threshold=threshold, reuse=reuse)
    pruned = pruned_copy(moe)
    assert moe.router.reuse == reuse and not moe._sketch_reuse
    x = torch.randn(20, D)
    unpruned = MoEFFN({**moe.spec, "router": {"kind": "sketch", "options": {"channels": moe.router.channels}}})
    unpruned.load_state_dict(moe.state_dict(), strict=False)
    assert not torch.allclose(moe.router(x), unpruned.router(x), atol=1e-3)  # the pruning changes the scores
    for rows in (x, x[:1], x[3:6]):
        torch.testing.assert_close(moe.router(rows), pruned.router(rows), atol=1e-4, rtol=1e-4)
        scores = moe.router(rows)
        kept = rows.abs().topk(moe.router.kept, dim=-1).indices
        masked = torch.zeros_like(rows).scatter_(-1, kept, rows.gather(-1, kept))
        sketched_out = pruned.expert_outputs(masked)  # [E, T, D]
        if threshold:
            t1, t2 = moe.thresholds()
            exact, sketched = scores >= t1, (scores >= t2) & (scores < t1)
        else:
            top = scores.topk(moe.top_k + moe.approx_k, dim=-1).indices
            exact = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top[:, :moe.top_k], True)
            sketched = torch.zeros_like(exact).scatter_(1, top[:, moe.top_k:], True)
        extra = torch.stack([sketched_out[sketched[t], t].sum(0) for t in range(len(rows))])
        torch.testing.assert_close(moe(rows), moe.forward_reference(rows, exact) + extra, atol=1e-4, rtol=1e-5)


def test_pruned_sketch_costs_its_nonzero_products():
    """The sketch's FLOPs are its nonzero products on the kept channels, as measured on the
    calibration text; the exact experts pay for every channel without reuse, and with it for all
    but the sketch's nonzero products (the same outputs: the saving is counted, not executed)."""
    moe, calib = pruned_moe(sparsity=0.5)
    r = moe.router
    E, n, _ = moe.w_in.shape
    masks = moe.router.masks()
    assert all(int(m.sum(1).min()) == int(m.sum(1).max()) == D - 12 for m in masks)  # each row keeps half
    kept = calib.abs().topk(r.kept, dim=-1).indices
    x = calib[torch.linspace(0, len(calib) - 1, len(calib)).long()]
    nnz = sum(m.sum(0).float() for m in masks)[x.abs().topk(r.kept, dim=-1).indices].sum(-1).mean()
    assert r.density_at(r.kept) == pytest.approx(float(nnz) / (r.kept * 2 * E * n), rel=1e-5)
    assert 0.5 < r.density_at(r.kept) < 1  # the larger channels keep more of their weights
    assert r.flops_per_token() == pytest.approx(2 * r.kept * E * n * 2 * r.density_at(r.kept) + 2 * E * n * n)
    assert moe._expert_flops() == 2 * 3 * D * n  # no partial sums to start from
    assert kept.shape[1] == r.kept
    x = torch.randn(9, D)
    moe.set_router_approx(0.0)  # (the sketched experts' count follows the exact ones' cost)
    before = moe(x)
    moe.set_router_reuse(True)
    assert r.reuse and not moe._sketch_reuse and moe.spec["router"]["options"]["reuse"]
    reused = 2 * r.kept * 2 * r.density_at(r.kept)  # the sketch's nonzero gate and up products of a neuron
    assert moe._expert_flops() == pytest.approx(2 * 3 * D * n - n * reused)
    torch.testing.assert_close(moe(x), before)
    moe.set_router_reuse(False)
    moe.set_router_approx(0.3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_moe(router="sketch", channels=0.5, sparsity=1.0)
    _, plain = make_moe(router="sketch", channels=0.5)
    with pytest.raises(ValueError, match="pruned"):
        plain.fit_sketch_sparsity(calib)
    # saved and loaded: the norms, the density and the masks come back
    fresh = MoEFFN(moe.spec).requires_grad_(False)  # the inference path, as moe's
    fresh.load_state_dict(moe.state_dict())
    x = torch.randn(7, D)
    torch.testing.assert_close(fresh(x), moe(x))
    assert fresh.router.flops_per_token() == r.flops_per_token()


def test_pruned_sketch_trains_through_its_masks():
    """The training path gives the inference output; the sketched experts' gradient reaches only
    the weights the sketch keeps, and the masks follow the weights once they change."""
    moe, _ = pruned_moe(top_k=4)
    moe.requires_grad_(True)
    x = torch.randn(6, D)
    with torch.no_grad():
        expected = moe(x)
    moe.w_in.requires_grad_(True)
    with torch.enable_grad():
        y = moe(x)
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)
        # only the sketch path: the exact experts' rows see every channel
        h = moe.router.hidden_from(x, x.abs().topk(moe.router.kept, dim=-1).indices)[0]
        moe.w_in.grad = None
        h.sum().backward()
    pruned_away = ~moe.router.masks()[0]
    assert moe.w_in.grad.flatten(0, 1)[pruned_away].abs().max() == 0
    before = moe.router.weights_view()[0].clone()
    with torch.no_grad():
        moe.w_in.mul_(torch.rand_like(moe.w_in))
    assert not torch.equal(before, moe.router.weights_view()[0])
