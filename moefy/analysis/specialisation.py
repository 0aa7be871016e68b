"""Expert specialisation by text domain (issue #7 part 5; MoEfication's clusters against domains,
as in the modularity analysis of Pochinkov et al. and the domain specialisation of moe-lrc /
OLMoE): which experts each domain's tokens select, per layer, and how much two domains share.

For domains a and b and each layer, from the selection frequencies u_a, u_b [E] (share of the
domain's tokens that select each routed expert) and the usage distributions p = u / sum(u):
- jaccard: |A & B| / |A | B| of the top-n experts of each domain (n = the layer's k: the one
  fixed expert set a token could use for the whole domain);
- js: Jensen-Shannon divergence between p_a and p_b (base 2, so in [0, 1]; scipy);
- tv: total-variation distance 0.5 * sum |p_a - p_b| (the share of selections to move);
- coverage: the share of domain b's selections that domain a's top-n set holds (and a's own
  share), i.e. a static expert cache chosen on one domain and served another;
- leaning: experts selected at least twice as often in one domain as in the other, among those
  selected by >= 1% of either domain's tokens.
Each domain's blocks are also split in two halves and compared with each other (`within`): the
noise floor (with half the tokens on each side, a generous one). Differences between domains mean
something only above it.

# N layers, E routed experts
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.distance import jensenshannon

LEAN_RATIO = 2.0
LEAN_MIN_FREQ = 0.01


def compare(u_a: torch.Tensor, u_b: torch.Tensor, n: int) -> dict:
    """Overlap of two domains' selection frequencies u_a, u_b [E] with top-n sets."""
    p_a, p_b = (u / u.sum() for u in (u_a.double(), u_b.double()))
    top_a, top_b = (set(u.topk(n).indices.tolist()) for u in (u_a, u_b))
    big = torch.maximum(u_a, u_b) >= LEAN_MIN_FREQ
    ratio = (torch.maximum(u_a, u_b) / torch.minimum(u_a, u_b).clamp_min(1e-12))[big]
    idx_a = torch.tensor(sorted(top_a))
    return {"jaccard": len(top_a & top_b) / len(top_a | top_b),
            "js": float(jensenshannon(p_a.numpy(), p_b.numpy(), base=2) ** 2),
            "tv": float(0.5 * (p_a - p_b).abs().sum()),
            "coverage_self": float(p_a[idx_a].sum()), "coverage_other": float(p_b[idx_a].sum()),
            "leaning": int((ratio >= LEAN_RATIO).sum())}


def analyse(masks: dict[str, list[torch.Tensor]]) -> dict:
    """Per layer and domain: selection frequencies, the between-domain comparison and the
    within-domain noise floor. masks: two domains' routes.routing_masks ([B, L, E] per layer); the
    domain with more blocks is cut to the other's count."""
    from moefy.analysis.routes import mean_k, usage

    if len(masks) != 2:
        raise ValueError("specialisation compares exactly two domains")
    (name_a, a), (name_b, b) = masks.items()
    n_blocks = min(len(a[0]), len(b[0]))  # equal token counts, so both frequencies are equally noisy
    a, b = [x[:n_blocks] for x in a], [x[:n_blocks] for x in b]
    layers = []
    for i, (ma, mb) in enumerate(zip(a, b)):
        u_a, u_b = usage([ma])[0], usage([mb])[0]
        n = max(1, round((mean_k(ma) + mean_k(mb)) / 2))
        within = [compare(*(usage([h])[0] for h in halves(mx)), n) for mx in (ma, mb)]
        layers.append({"layer": i, "experts": len(u_a), "top_n": n, **compare(u_a, u_b, n),
                       "within": {k: float(np.mean([w[k] for w in within])) for k in ("jaccard", "js", "tv")},
                       "usage": {name_a: [round(float(v), 5) for v in u_a], name_b: [round(float(v), 5) for v in u_b]}})
    keys = ("jaccard", "js", "tv", "coverage_self", "coverage_other", "leaning")
    thirds = np.array_split(np.arange(len(layers)), 3)
    by_depth = [{"layers": [int(idx[0]), int(idx[-1])],
                 **{k: float(np.mean([layers[j][k] for j in idx])) for k in keys},
                 **{f"within_{k}": float(np.mean([layers[j]["within"][k] for j in idx])) for k in ("jaccard", "js", "tv")}}
                for idx in thirds if len(idx)]
    return {"domains": [name_a, name_b], "tokens": {name_a: int(a[0].shape[0] * a[0].shape[1]),
                                                    name_b: int(b[0].shape[0] * b[0].shape[1])},
            "by_depth": by_depth, "layers": layers}


def halves(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A domain's selections [B, L, E] in two halves by block (by token when there is one block)."""
    if len(mask) < 2:
        h = mask.shape[1] // 2
        return mask[:, :h], mask[:, h:2 * h]
    h = len(mask) // 2
    return mask[:h], mask[h:]


def plot(result: dict, path, title: str = ""):
    """By layer: JS divergence and TV distance between the domains (dotted: within a domain),
    Jaccard of the top-n sets, and how much of each domain a static set chosen on the first covers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = result["domains"]
    layers = result["layers"]
    x = [r["layer"] for r in layers]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, label, c in (("js", "Jensen-Shannon", "C0"), ("tv", "total variation", "C1")):
        ax.plot(x, [r[key] for r in layers], "o-", ms=3, color=c, label=label)
        ax.plot(x, [r["within"][key] for r in layers], ":", color=c, label=f"{label}, within a domain")
    ax.set(xlabel="layer", ylabel="distance between usage distributions", title="Usage distributions: domain vs domain")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(x, [r["jaccard"] for r in layers], "o-", ms=3, label="between the domains")
    ax.plot(x, [r["within"]["jaccard"] for r in layers], ":", color="C0", label="within a domain (halves)")
    ax.set(xlabel="layer", ylabel="Jaccard", ylim=(0, 1.02), title="Top-k experts of each domain: overlap")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(x, [r["coverage_self"] for r in layers], "o-", ms=3, label=f"on {a}")
    ax.plot(x, [r["coverage_other"] for r in layers], "o-", ms=3, label=f"on {b}")
    ax.set(xlabel="layer", ylabel="share of selections held", ylim=(0, 1.02),
           title=f"Static set: {a}'s top-k experts")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{title + ': ' if title else ''}{a} vs {b}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The comparison by depth (thirds of the layers), as a Markdown table."""
    a, b = result["domains"]
    lines = [f"| layers | Jaccard top-k (within) | JS (within) | TV (within) | held by {a}'s top-k: of {a} / of {b} "
             "| leaning experts |",
             "|---|---|---|---|---|---|"]
    for d in result["by_depth"]:
        lines.append(f"| {d['layers'][0]}-{d['layers'][1]} | {d['jaccard']:.3f} ({d['within_jaccard']:.3f}) | "
                     f"{d['js']:.4f} ({d['within_js']:.4f}) | {d['tv']:.3f} ({d['within_tv']:.3f}) | "
                     f"{d['coverage_self']:.3f} / {d['coverage_other']:.3f} | {d['leaning']:.1f} |")
    return "\n".join(lines)


__all__ = ["compare", "analyse", "halves", "plot", "markdown"]
