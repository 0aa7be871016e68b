"""The sparse-expert FFN of Sparse Expansion (Sawmya et al.): E pruned copies of one dense FFN,
each token routed to the copy of its nearest centroid in a PCA projection of the FFN input.

Weights are stored compactly as CSR, expert-major (values fp32, column indices int16, row
pointers int32), never as dense copies. With one expert there is no router: it is a plainly
pruned FFN (SparseGPT, Wanda or magnitude).

This file imports torch only: it is copied into every saved moefy folder so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without moefy.

# T tokens, D hidden, I ffn width, E experts, P PCA dimensions, Z non-zeros of one matrix
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
TYPE = "sparse_expansion"
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def nearest_centroid(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid [E, P] of each point z [T, P] (squared Euclidean)."""
    dist = (z.square().sum(1, keepdim=True) - 2 * z @ centroids.T
            + centroids.square().sum(1)[None, :])  # [T, E]
    return dist.argmin(1)


class SparseExpertFFN(nn.Module):
    """Drop-in for a dense FFN (SwiGLU or biased MLP): y = W_out^T h, h = act(W_in x + b) * (W_up x),
    with the (W_in, W_up, W_out) of the token's expert. Matrices are kept as nn.Linear stores
    them: w_in, w_up [I, D], w_out [D, I]; biases are shared by all experts (pruning keeps them).

    `execution` = "sparse" multiplies the CSR matrices (torch.sparse.mm); "dense" expands each
    routed expert's CSR to a dense matrix for the call (same numbers up to summation order,
    faster for perplexity runs on CPU). Both compute only the experts that tokens are routed to.
    """

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        D, I, E, P = spec["hidden"], spec["width"], spec["num_experts"], spec["pca_dim"]
        self.act = spec["act"]
        self.gated = spec["kind"] == "swiglu"
        self.execution = "sparse"
        self._col_cache: dict = {}
        self.register_buffer("pca_mean", torch.zeros(D))
        self.register_buffer("pca_basis", torch.zeros(P, D))
        self.register_buffer("centroids", torch.zeros(E, P))
        for name, rows in self.shapes().items():
            nnz = spec["nnz"][name]
            self.register_buffer(f"{name}_crow", torch.zeros(E, rows[0] + 1, dtype=torch.int32))
            self.register_buffer(f"{name}_col", torch.zeros(E, nnz, dtype=torch.int16))
            self.register_buffer(f"{name}_val", torch.zeros(E, nnz))
        self.b_in = nn.Parameter(torch.zeros(I)) if spec["bias_in"] else None
        self.b_out = nn.Parameter(torch.zeros(D)) if spec["bias_out"] else None
        self.reset_counters()

    def shapes(self) -> dict[str, tuple[int, int]]:
        D, I = self.spec["hidden"], self.spec["width"]
        out = {"w_in": (I, D), "w_out": (D, I)}
        if self.spec["kind"] == "swiglu":
            out["w_up"] = (I, D)
        return out

    @staticmethod
    def make_spec(*, kind, act, hidden, width, num_experts, pca_dim, bias_in, bias_out, nnz) -> dict:
        return dict(type=TYPE, kind=kind, act=act, hidden=hidden, width=width, num_experts=num_experts,
                    pca_dim=pca_dim, bias_in=bias_in, bias_out=bias_out, nnz=dict(nnz))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, *, kind: str, act: str, experts: list[dict[str, torch.Tensor]],
                     b_in=None, b_out=None, pca_mean=None, pca_basis=None, centroids=None) -> "SparseExpertFFN":
        """Build from pruned dense matrices, one dict {w_in, w_up, w_out} per expert (nn.Linear
        orientation); every expert's matrix must have the same number of non-zeros."""
        w = experts[0]["w_in"]
        I, D = w.shape
        nnz = {}
        for name in experts[0]:
            counts = {int((e[name] != 0).sum()) for e in experts}
            if len(counts) != 1:
                raise ValueError(f"{name}: experts differ in their number of non-zeros {sorted(counts)}")
            nnz[name] = counts.pop()
        P = 0 if pca_basis is None else pca_basis.shape[0]
        spec = cls.make_spec(kind=kind, act=act, hidden=D, width=I, num_experts=len(experts), pca_dim=P,
                             bias_in=b_in is not None, bias_out=b_out is not None, nnz=nnz)
        layer = cls(spec)
        for e, mats in enumerate(experts):
            for name, dense in mats.items():
                with warnings.catch_warnings():  # "CSR support is in beta"
                    warnings.simplefilter("ignore")
                    csr = dense.float().to_sparse_csr()
                getattr(layer, f"{name}_crow")[e] = csr.crow_indices()
                getattr(layer, f"{name}_col")[e] = csr.col_indices()
                getattr(layer, f"{name}_val")[e] = csr.values()
        for name, value in (("pca_mean", pca_mean), ("pca_basis", pca_basis), ("centroids", centroids),
                            ("b_in", b_in), ("b_out", b_out)):
            if value is not None and value.numel():
                getattr(layer, name).copy_(value)
        return layer

    # -- weights ----------------------------------------------------------------------------------

    def csr(self, name: str, e: int) -> torch.Tensor:
        """Expert e's matrix `name` as a torch sparse CSR tensor (views of the stored buffers)."""
        return torch.sparse_csr_tensor(getattr(self, f"{name}_crow")[e], self._col32(name)[e],
                                       getattr(self, f"{name}_val")[e], self.shapes()[name],
                                       check_invariants=False)

    def _col32(self, name: str) -> torch.Tensor:
        """The int32 column indices torch's CSR kernels need, converted once from the stored int16
        and kept outside the state dict; rebuilt when the buffer is replaced or changed."""
        col = getattr(self, f"{name}_col")
        key = (col.data_ptr(), col._version)
        cached = self._col_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._col_cache[name] = (key, col.int())
        return cached[1]

    def dense(self, name: str, e: int) -> torch.Tensor:
        return self.csr(name, e).to_dense()

    # -- routing ----------------------------------------------------------------------------------

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pca_mean) @ self.pca_basis.T  # [T, P]

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Expert of each token, [T]: the nearest centroid (squared Euclidean) in PCA space."""
        if self.spec["num_experts"] == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return nearest_centroid(self.project(x), self.centroids)


    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        experts = self.route(x)
        self.tokens_seen += x.shape[0]
        if self.spec["num_experts"] == 1:
            y = self.expert(0, x)
        else:
            y = x.new_zeros(x.shape)
            order = experts.argsort(stable=True)
            counts = torch.bincount(experts, minlength=self.spec["num_experts"]).tolist()
            for e, t in enumerate(order.split(counts)):
                if len(t):
                    y.index_copy_(0, t, self.expert(e, x.index_select(0, t)))
        if self.b_out is not None:
            y = y + self.b_out
        return y.reshape(shape)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [T, D] -> [T, D], computed transposed ([I, T]) so the sparse
        matrix stays on the left of every product."""
        mm = self._mm_sparse if self.execution == "sparse" else self._mm_dense
        xt = x.T  # [D, T]
        h = mm("w_in", e, xt)  # [I, T]
        if self.b_in is not None:
            h = h + self.b_in[:, None]
        h = ACTIVATIONS[self.act](h)
        if self.gated:
            h = h * mm("w_up", e, xt)
        return mm("w_out", e, h).T  # [T, D]

    def _mm_sparse(self, name, e, xt):
        return torch.sparse.mm(self.csr(name, e), xt.contiguous())

    def _mm_dense(self, name, e, xt):
        return self.dense(name, e) @ xt

    # -- bookkeeping ------------------------------------------------------------------------------

    def reset_counters(self):
        self.tokens_seen = 0

    def dense_flops_per_token(self) -> int:
        D, I = self.spec["hidden"], self.spec["width"]
        return 2 * len(self.shapes()) * D * I

    def router_flops_per_token(self) -> int:
        if self.spec["num_experts"] == 1:
            return 0
        D, E, P = self.spec["hidden"], self.spec["num_experts"], self.spec["pca_dim"]
        return 2 * D * P + 3 * E * P  # projection, then distances

    def flops_per_token(self) -> int:
        """FFN FLOPs of one token: its expert's non-zeros (multiply-add = 2) plus the router."""
        return 2 * sum(self.spec["nnz"].values()) + self.router_flops_per_token()

    def extra_repr(self) -> str:
        s = self.spec
        dens = sum(s["nnz"].values()) / sum(r * c for r, c in self.shapes().values())
        return f"experts={s['num_experts']}, hidden={s['hidden']}, width={s['width']}, density={dens:.3f}, pca_dim={s['pca_dim']}"
