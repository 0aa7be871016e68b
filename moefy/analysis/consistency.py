"""Local routing consistency of a converted model (moe-lrc: Liang et al., "Not All Models Suit
Expert Offloading: On Local Routing Consistency of Mixture-of-Expert Models", arXiv 2505.16056).

Do consecutive tokens select the same experts? If they do, an expert cache a few times the size
of k serves most selections and experts can be offloaded. Two metrics, per layer and segment
length m (tokens), on the routed experts only (shared neurons are always computed):

SRP, segment routing best performance (paper section 2.2, appendix C): a segment router selects
one fixed set of experts for all m tokens of a segment starting at any position i (sliding, every
i with i + m <= L inside a block). Scored against the per-token selections as one pooled binary
classification over (segment, token, expert), its F1 is largest when it selects every expert used
f >= alpha times in the segment, for one threshold alpha (the items all cost m predictions, so
taking them by decreasing f is optimal). SRP is that best F1; the size ratio rho^ is how many
experts the segment router then selects per token relative to the router (pred / actual).

SCH, segment cache best hit rate (paper section 2.3): an expert cache of C = rho x k experts (k the
mean experts per token). For each token the cache loads the selected experts it lacks and, when
full, evicts as many experts the token did not use, those selected fewest times in the rest of
the token's m-token segment (the next m - 1 tokens; ties: least recently used), as moe-lrc's
reference code does. SCH is the share of selections found in the cache. The cache starts empty
and is reset for every block; while it has free slots, an expert seen for the first time counts
as a hit (an ideal cache fills free slots ahead of need), so a cache of every expert scores 1.

Two references make the numbers readable: `srp_shuffled`, SRP with the tokens of all blocks
shuffled (what usage imbalance alone gives, no order), and `lru`, the hit rate of a plain LRU
cache of the same size (no knowledge of the future).

# B blocks, L tokens per block, E routed experts, W segments per block (L - m + 1), N layers
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moefy.errors import ConfigError

SEGMENTS = (4, 16, 64, 256)
CACHE_RATIOS = (1.0, 2.0, 4.0)


def window_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """How often each expert is selected in every m-token segment: mask [B, L, E] -> [B, W, E]."""
    c = F.pad(mask.to(torch.int32).cumsum(1), (0, 0, 1, 0))  # [B, L + 1, E]
    return c[:, m:] - c[:, :-m]


def segment_histogram(mask: torch.Tensor, m: int) -> torch.Tensor:
    """hist[e, f]: the number of m-token segments in which expert e is selected f times, [E, m + 1]."""
    counts = window_counts(mask, m).flatten(0, 1).T.long()  # [E, B*W]
    return torch.zeros(counts.shape[0], m + 1, dtype=torch.long).scatter_add_(1, counts, torch.ones_like(counts))


def best_f1(hist: torch.Tensor, m: int) -> dict:
    """SRP from a pooled histogram [m + 1] (segments by selection count f): the best F1 over
    thresholds alpha of the segment router "select every expert used >= alpha times"."""
    f = torch.arange(m + 1, dtype=torch.float64)
    h = hist.double()
    tp = (h * f).flip(0).cumsum(0).flip(0)  # true positives at each alpha: sum_{f >= alpha} f * n_f
    pred = m * h.flip(0).cumsum(0).flip(0)  # predicted positives: m per selected (segment, expert)
    actual = tp[0]
    if actual == 0:
        return {"srp": float("nan"), "threshold": None, "size_ratio": float("nan")}
    f1 = 2 * tp / (pred + actual)
    alpha = int(f1.argmax())
    return {"srp": float(f1[alpha]), "threshold": alpha, "size_ratio": float(pred[alpha] / actual)}


def srp(mask: torch.Tensor, m: int) -> dict:
    """SRP of one layer's selections mask [B, L, E] at segment length m."""
    return best_f1(segment_histogram(mask, m).sum(0), m)


def cache_hits(seqs: np.ndarray, capacity: np.ndarray, lookahead: int | None) -> np.ndarray:
    """Simulated expert caches, one per sequence, all in step: seqs [S, L, E] bool (token t selects
    expert e), capacity [S] experts. lookahead=m: moe-lrc's segment cache (evict the unused experts
    with the fewest selections in the next m - 1 tokens, then the least recently used); None: LRU.
    Returns the hits per sequence [S] (see the module docstring for the rules)."""
    S, L, E = seqs.shape
    csum = np.zeros((S, L + 1, E), np.int32)
    np.cumsum(seqs, axis=1, out=csum[:, 1:])
    cached = np.zeros((S, E), bool)
    last = np.full((S, E), -1, np.int64)  # the last token that used each expert
    size = np.zeros(S, np.int64)
    hits = np.zeros(S, np.int64)
    rank = np.empty((S, E), np.int64)
    rows = np.arange(S)[:, None]
    for t in range(L):
        need = seqs[:, t]  # [S, E]
        n_hit = (cached & need).sum(1)
        n_new = need.sum(1) - n_hit
        hits += n_hit + np.minimum(n_new, np.maximum(capacity - size, 0))  # free slots were filled ahead
        cached |= need
        last[need] = t
        size += n_new
        over = size - capacity
        if (over <= 0).all():
            continue
        future = (csum[:, min(t + lookahead, L)] - csum[:, t + 1]) if lookahead else np.zeros((S, E), np.int32)
        # Eviction order: not used by this token first, then fewest future uses, then least recent,
        # then the lowest expert id (stable sort).
        key = (need * (L + 1) + future) * (L + 2) + (last + 1)
        key[~cached] = np.iinfo(np.int64).max
        rank[rows, np.argsort(key, axis=1, kind="stable")] = np.arange(E)
        cached &= ~(rank < over[:, None])
        size = np.minimum(size, capacity)
    return hits


def sch(mask: torch.Tensor, m: int | None, capacity: int) -> float:
    """Hit rate of the segment cache (m tokens; None: LRU) with `capacity` experts on one layer's
    selections mask [B, L, E], one cache per block."""
    seqs = mask.numpy()
    total = int(seqs.sum())
    hits = cache_hits(seqs, np.full(len(seqs), capacity), m)
    return float(hits.sum() / total) if total else float("nan")


def shuffled(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same per-token selections with the tokens of all blocks in random order [B, L, E]."""
    flat = mask.flatten(0, 1)
    perm = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))
    return flat[perm].view(mask.shape)


def check(seq_len: int, segments, ratios):
    if not segments or any(m < 1 or m > seq_len for m in segments):
        raise ConfigError(f"segment lengths must be in [1, {seq_len}] (the tokens per block), got {list(segments)}; "
                          "raise --seq-len or lower --m")
    if not ratios or any(r <= 0 for r in ratios):
        raise ConfigError(f"cache ratios must be positive, got {list(ratios)}")


def analyse(masks: list[torch.Tensor], segments=SEGMENTS, ratios=CACHE_RATIOS, seed: int = 0) -> dict:
    """SRP and SCH for every layer's selections masks [B, L, E] (routes.routing_masks), every
    segment length and cache ratio; per layer, and pooled / averaged over layers."""
    from moefy.analysis.routes import mean_k

    check(masks[0].shape[1], segments, ratios)
    layers, pooled, pooled_shuffled = [], {}, {}
    for i, mask in enumerate(masks):
        E, k = mask.shape[-1], mean_k(mask)
        row = {"layer": i, "experts": E, "mean_k": k, "srp": {}, "srp_shuffled": {}, "sch": {}}
        mixed = shuffled(mask, seed + i)
        for m in segments:
            hist, hist_shuffled = segment_histogram(mask, m).sum(0), segment_histogram(mixed, m).sum(0)
            row["srp"][str(m)] = best_f1(hist, m)
            row["srp_shuffled"][str(m)] = best_f1(hist_shuffled, m)["srp"]
            pooled[m] = pooled.get(m, 0) + hist
            pooled_shuffled[m] = pooled_shuffled.get(m, 0) + hist_shuffled
        for rho in ratios:
            capacity = min(E, max(1, round(rho * k)))
            row["sch"][f"{rho:g}"] = {"cache": capacity, "all_experts": capacity >= E, "lru": sch(mask, None, capacity),
                                      "m": {str(m): sch(mask, m, capacity) for m in segments}}
        layers.append(row)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    model = {
        "srp_pooled": {str(m): best_f1(pooled[m], m) for m in segments},
        "srp_shuffled_pooled": {str(m): best_f1(pooled_shuffled[m], m)["srp"] for m in segments},
        "srp_mean": {str(m): mean([r["srp"][str(m)]["srp"] for r in layers]) for m in segments},
        "size_ratio_mean": {str(m): mean([r["srp"][str(m)]["size_ratio"] for r in layers]) for m in segments},
        "srp_shuffled_mean": {str(m): mean([r["srp_shuffled"][str(m)] for r in layers]) for m in segments},
        "sch_mean": {f"{rho:g}": {str(m): mean([r["sch"][f"{rho:g}"]["m"][str(m)] for r in layers]) for m in segments}
                     for rho in ratios},
        "lru_mean": {f"{rho:g}": mean([r["sch"][f"{rho:g}"]["lru"] for r in layers]) for rho in ratios},
    }
    B, L, _ = masks[0].shape
    return {"blocks": B, "seq_len": L, "tokens": B * L, "segments": list(segments),
            "cache_ratios": list(ratios), "model": model, "layers": layers}


def plot(result: dict, path, title: str = ""):
    """SRP by layer (one line per m, dotted: tokens shuffled), SCH by layer at each cache ratio
    (m = 16, dotted: LRU), and the layer-mean SCH against m."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, segments, ratios = result["layers"], result["segments"], result["cache_ratios"]
    x = [r["layer"] for r in layers]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(segments), len(ratios))))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    ax = axes[0]
    for c, m in zip(colors, segments):
        ax.plot(x, [r["srp"][str(m)]["srp"] for r in layers], "o-", ms=3, color=c, label=f"m = {m}")
        ax.plot(x, [r["srp_shuffled"][str(m)] for r in layers], ":", color=c)
    ax.set(xlabel="layer", ylabel="SRP (best F1 of one expert set per segment)", ylim=(0, 1.02),
           title="SRP by layer (dotted: tokens shuffled)")
    ax.legend(fontsize=8, ncol=2)
    m_mid = 16 if 16 in segments else segments[len(segments) // 2]
    ax = axes[1]
    for c, rho in zip(colors, ratios):
        key = f"{rho:g}"
        label = f"cache {key} x k" + (" (all experts)" if all(r["sch"][key]["all_experts"] for r in layers) else "")
        ax.plot(x, [r["sch"][key]["m"][str(m_mid)] for r in layers], "o-", ms=3, color=c, label=label)
        ax.plot(x, [r["sch"][key]["lru"] for r in layers], ":", color=c)
    ax.set(xlabel="layer", ylabel="hit rate", ylim=(0, 1.02), title=f"SCH by layer, m = {m_mid} (dotted: LRU)")
    ax.legend(fontsize=8)
    ax = axes[2]
    model = result["model"]
    for c, rho in zip(colors, ratios):
        key = f"{rho:g}"
        ax.plot(segments, [model["sch_mean"][key][str(m)] for m in segments], "o-", color=c, label=f"SCH, {key} x k")
        ax.axhline(model["lru_mean"][key], color=c, ls=":", lw=1)
    ax.plot(segments, [model["srp_mean"][str(m)] for m in segments], "s--", color="k", label="SRP")
    ax.set_xscale("log", base=2)
    ax.set_xticks(segments, [str(m) for m in segments])
    ax.set(xlabel="segment length m (tokens)", ylabel="mean over layers", ylim=(0, 1.02), title="Mean over layers")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The layer means (and pooled SRP) by segment length, as a Markdown table."""
    model, ratios = result["model"], result["cache_ratios"]
    head = ["m", "SRP (mean)", "size ratio", "SRP pooled", "SRP shuffled"] + [f"SCH {r:g}x k" for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["segments"]:
        s = str(m)
        cells = [s, f"{model['srp_mean'][s]:.3f}", f"{model['size_ratio_mean'][s]:.2f}",
                 f"{model['srp_pooled'][s]['srp']:.3f}", f"{model['srp_shuffled_mean'][s]:.3f}"]
        cells += [f"{model['sch_mean'][f'{r:g}'][s]:.3f}" for r in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| LRU | | | | | " + " | ".join(f"{model['lru_mean'][f'{r:g}']:.3f}" for r in ratios) + " |")
    return "\n".join(lines)


__all__ = ["window_counts", "segment_histogram", "best_f1", "srp", "cache_hits", "sch", "shuffled", "analyse",
           "plot", "markdown", "SEGMENTS", "CACHE_RATIOS"]
