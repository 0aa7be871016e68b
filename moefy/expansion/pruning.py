"""One-shot pruning of a linear layer from calibration inputs: SparseGPT, Wanda, magnitude.

Every function takes a weight W [R, C] as nn.Linear stores it (rows = outputs, columns =
inputs) and returns the pruned copy; nothing is modified in place. Sparsity is exact: the
number of zeros chosen is fixed by the shape and the setting alone (see `pruned_count`), so
every expert of a layer has the same number of non-zeros.

N:M means "at most N non-zeros in every M consecutive inputs of a row" (2:4 keeps 2 of 4,
Zhou et al. 2021, NVIDIA's sparse tensor cores); its sparsity is 1 - N/M.

# N tokens, R rows (outputs), C columns (inputs), B block of columns
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moefy.errors import ConfigError

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "sparsegpt"        # one of METHODS
    sparsity: float = 0.5            # share of each matrix's weights set to zero, in [0, 1)
    nm: tuple[int, int] | None = None  # (N, M): keep N of every M consecutive inputs; replaces `sparsity`
    blocksize: int = 128             # SparseGPT: columns per lazy-update block
    percdamp: float = 0.01           # SparseGPT: damping, this share of the mean Hessian diagonal

    def validate(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose from {', '.join(METHODS)}")
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise ConfigError(f"N:M needs 0 < N < M, got {n}:{m}")
            if self.blocksize % m:
                raise ConfigError(f"M ({m}) must divide the SparseGPT block size ({self.blocksize})")
        if self.blocksize < 1 or self.percdamp < 0:
            raise ConfigError("blocksize must be positive and percdamp non-negative")

    @property
    def density(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else 1 - self.sparsity

    def to_dict(self) -> dict:
        return {"method": self.method, "sparsity": 1 - self.density, "nm": list(self.nm) if self.nm else None,
                "blocksize": self.blocksize, "percdamp": self.percdamp}


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None stays None. Errors name the expected form."""
    if text is None:
        return None
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise ConfigError(f"N:M must look like 2:4 (keep N of every M weights), got {text!r}") from None
    if not 0 < n < m:
        raise ConfigError(f"N:M needs 0 < N < M, got {text}")
    return n, m


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights an unstructured mask sets to zero."""
    return round(sparsity * numel)


class InputStats:
    """Streaming statistics of a linear layer's inputs x [N, C]: the Gram matrix X^T X (SparseGPT's
    Hessian, unless `diagonal_only`; fp32 like the reference implementation, the product is the
    cost of calibration) and the squared column norms ||x_j||^2 (Wanda, fp64)."""

    def __init__(self, columns: int, diagonal_only: bool = False):
        self.tokens = 0
        self.sq_norms = torch.zeros(columns, dtype=torch.float64)
        self.gram = None if diagonal_only else torch.zeros(columns, columns)

    def add_batch(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq_norms += x.double().square().sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)  # [C, C]

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / N (SparseGPT, eq. 1 of Frantar & Alistarh 2023), fp32."""
        if self.gram is None:
            raise ValueError("these InputStats keep only the diagonal")
        return 2 * self.gram / max(self.tokens, 1)


def prune(w: torch.Tensor, stats: InputStats | None, cfg: PruneConfig) -> torch.Tensor:
    """The pruned copy of W [R, C] by cfg.method (stats unused by magnitude)."""
    if cfg.method == "magnitude":
        return magnitude(w, cfg.sparsity, cfg.nm)
    if stats is None:
        raise ValueError(f"{cfg.method} needs the layer's input statistics")
    if cfg.method == "wanda":
        return wanda(w, stats.sq_norms.sqrt().float(), cfg.sparsity, cfg.nm)
    return sparsegpt(w, stats.hessian(), cfg.sparsity, cfg.nm, blocksize=cfg.blocksize, percdamp=cfg.percdamp)


# -- masks ------------------------------------------------------------------------------------


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask [R, C] of the weights to prune: in every M consecutive columns of a row,
    all but the N largest scores. C must be a multiple of M."""
    R, C = scores.shape
    if C % m:
        raise ConfigError(f"N:M needs the input width ({C}) to be a multiple of M ({m})")
    groups = scores.reshape(R, C // m, m)
    drop = groups.topk(m - n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(R, C)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of exactly `count` lowest scores over the whole tensor (ties broken by
    position). A selection (kthvalue), not a sort: this runs once per SparseGPT block."""
    flat = scores.flatten()
    if count <= 0 or count >= flat.numel():
        return torch.full_like(scores, count > 0, dtype=torch.bool)
    kth = flat.kthvalue(count).values
    mask = flat < kth
    ties = (flat == kth).nonzero().squeeze(1)[: count - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(scores)


def row_lowest_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of the round(sparsity * C) lowest scores of every row."""
    k = pruned_count(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return mask


# -- baselines --------------------------------------------------------------------------------


def magnitude(w: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Magnitude pruning: the smallest |W| over the whole matrix (per matrix, not per row), or
    per group of M with N:M."""
    score = w.abs()
    mask = nm_mask(score, *nm) if nm else lowest_mask(score, pruned_count(w.numel(), sparsity))
    return w.masked_fill(mask, 0)


def wanda(w: torch.Tensor, col_norms: torch.Tensor, sparsity: float,
          nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda (Sun et al. 2024): score |W_ij| * ||x_j||_2, the lowest scores of each output row
    are pruned (the paper's per-output comparison group), or per group of M with N:M."""
    score = w.abs() * col_norms[None, :]  # [R, C]
    mask = nm_mask(score, *nm) if nm else row_lowest_mask(score, sparsity)
    return w.masked_fill(mask, 0)


# -- SparseGPT --------------------------------------------------------------------------------


def inverse_hessian_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H); inputs that
    never fire (zero diagonal) get H_jj = 1 so the factorisation exists (their weights are zeroed
    by the caller, as in the reference implementation)."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * h.diagonal().mean())
    for attempt in range(6):  # rank-deficient Hessians from few tokens: raise the damping until PD
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        h.diagonal().add_(percdamp * 10 ** attempt * h.diagonal().mean())
    else:
        raise ValueError("the Hessian is not positive definite even after damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


@torch.no_grad()
def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): sweep the columns left to right in
    blocks; in each block choose the mask adaptively by w^2 / [H^-1]_jj^2 (per group of M with
    N:M), zero the chosen weights one column at a time and spread each column's error over the
    block's remaining columns with the Cholesky rows of H^-1 (OBS update); the columns after the
    block get the block's accumulated error in one product (lazy batch update).

    Unstructured: block b prunes exactly its share so that blocks 0..b together prune
    round(sparsity * R * C_0..b), hence round(sparsity * R * C) in total."""
    W = w.detach().clone().float()  # [R, C]
    R, C = W.shape
    W[:, hessian.diagonal() == 0] = 0
    hinv = inverse_hessian_cholesky(hessian.float(), percdamp)  # [C, C] upper
    done = 0
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        # The block is kept transposed, [B, R], so each column of W is a contiguous row here.
        w1, h1 = W[:, i1:i2].T.contiguous(), hinv[i1:i2, i1:i2]  # [B, R], [B, B]
        err = torch.zeros_like(w1)
        d = h1.diagonal()
        if nm is None:
            count = pruned_count(R * i2, sparsity) - done
            mask = lowest_mask(w1.square() / d[:, None].square(), count)  # [B, R]
            done += count
        else:
            mask = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                mask[i:i + m] = nm_mask((w1[i:i + m].square() / d[i:i + m, None].square()).T, *nm).T
            q = w1[i].masked_fill(mask[i], 0)
            e = (w1[i] - q) / d[i]  # [R]
            w1[i:].addr_(h1[i, i:], e, alpha=-1)  # OBS update of the block's remaining columns
            w1[i] = q
            err[i] = e
        W[:, i1:i2] = w1.T
        W[:, i2:].sub_(err.T @ hinv[i1:i2, i2:])  # lazy batch update of the columns after the block
    return W.to(w.dtype)


def reconstruction_error(w: torch.Tensor, w_pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||X W^T - X W'^T||_F^2 / ||X W^T||_F^2 on inputs x [N, C]."""
    ref = x @ w.T
    return float((x @ (w - w_pruned).T).square().sum() / ref.square().sum().clamp_min(1e-30))


def density(w: torch.Tensor) -> float:
    return float((w != 0).sum()) / w.numel()


def describe(cfg: PruneConfig) -> str:
    return f"{cfg.method} {cfg.nm[0]}:{cfg.nm[1]}" if cfg.nm else f"{cfg.method} {1 - cfg.density:.0%}"


__all__ = ["METHODS", "PruneConfig", "InputStats", "prune", "sparsegpt", "wanda", "magnitude", "nm_mask",
           "parse_nm", "pruned_count", "reconstruction_error", "density"]
