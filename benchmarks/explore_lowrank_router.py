"""Recall of training-free low-rank sketches of the gate and up projections (whitened SVD on the
calibration inputs: the rank-r map that best reproduces W x in mean square), against the trained
MLP router of the default conversion, on layers 2, 15 and 27 of runs/smol-384, 4,096 held-out tokens.

    python benchmarks/explore_lowrank_router.py    # needs runs/smol-384 (the default conversion)
"""
import sys, time, torch, torch.nn.functional as F
from moefy import io
from moefy.pipeline import data as data_mod
from moefy.pipeline.route import recall
from moefy.modeling.selection import select_experts
torch.set_num_threads(1)
m = io.load("runs/smol-384")
tok = m.tokenizer
cal = data_mod.blocks("wiki-sample", tok, 256, max_tokens=16384)
held = data_mod.blocks("wiki-sample:heldout", tok, 256, max_tokens=4096)
LAYERS = [2, 15, 27]
with m.all_experts():
    ci = m.layer_inputs(cal); hi = m.layer_inputs(held)
def rec(moe, scores, x, k):
    chosen = select_experts(scores, k, None)
    norms = moe.expert_norms(x)
    oracle = norms.argsort(-1, descending=True).argsort(-1) < k
    return float((chosen & oracle).sum() / oracle.sum())
for li in LAYERS:
    moe = m.layers[li]
    X, H = ci[li], hi[li]
    E, n, D = moe.w_in.shape
    mlp = moe.router(H)
    ks = {"50": moe.top_k_for_share(0.5), "25": moe.top_k_for_share(0.25)}
    line = {kk: rec(moe, mlp, H, k) for kk, k in ks.items()}
    print(f"layer {li} k={ks} mlp router cost {moe.router.flops_per_token()} recall {line}", flush=True)
    Sigma = X.T.double() @ X.double() / len(X)
    L = torch.linalg.cholesky(Sigma + 1e-6 * Sigma.diagonal().mean() * torch.eye(D, dtype=torch.double))
    W = torch.cat([moe.w_in.reshape(E * n, D), moe.w_up.reshape(E * n, D)]).double()  # [2I, D]
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    gram = moe.w_out @ moe.w_out.transpose(1, 2)
    for r in (16, 32, 64, 128, 256):
        A = (U[:, :r] * S[:r]).float()
        B = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T.float()  # Vh_r L^{-1}: [r, D]
        z = H @ B.T
        gu = z @ A.T
        g, u = gu[:, :E * n], gu[:, E * n:]
        h = (F.silu(g) * u).view(-1, E, n).transpose(0, 1)
        sc = (torch.bmm(h, gram) * h).sum(-1).clamp_min(0).sqrt().T
        cost = 2 * (D * r + 2 * E * n * r)
        print(f"  rank {r}: cost {cost} ({cost / moe.dense_flops_per_token():.1%}) recall "
              + str({kk: round(rec(moe, sc, H, k), 3) for kk, k in ks.items()}), flush=True)
