"""The quality-vs-compute curve: held-out quality against FFN FLOPs per token, for several
expert-construction variants of one model on one data set.

The model is profiled once; each variant (method, router, shared share, experts) is built once and
evaluated at every compute budget, since `set_active` only changes each layer's top-k (grouping
and router training do not depend on it). Each point equals what `moefy convert` gives with the
same settings and `--active`. With oracle=True every point also carries the same experts' score
under perfect routing, so the curve shows how much is lost to the grouping and how much to the router.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

from moefy.arch import family_for
from moefy.config import DataConfig, MoEConfig
from moefy.pipeline.build import build
from moefy.pipeline.calibrate import calibrate
from moefy.pipeline.group import NEEDS_COACTIVATION
from moefy.errors import ConfigError
from moefy.eval.evaluate import dense_reference, evaluate


@dataclass(frozen=True)
class Variant:
    method: str = "coactivation"
    router: str = "mlp"
    shared: float = 0.1
    experts: int = 384

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """"method:router:shared:experts", e.g. "coactivation:mlp:0.1:384"."""
        parts = text.split(":")
        if len(parts) != 4:
            raise ConfigError(f"variant {text!r} must read method:router:shared:experts, e.g. coactivation:mlp:0.1:384")
        try:
            return cls(parts[0], parts[1], float(parts[2]), int(parts[3]))
        except ValueError:
            raise ConfigError(f"variant {text!r}: shared must be a number and experts an integer") from None

    def label(self) -> str:
        shared = f"+{self.shared:g} shared" if self.shared else ""
        return f"{self.method}/{self.router} {self.experts}{shared}"


def sweep(loaded, variants: list[Variant], actives: list[float], heldout, base: MoEConfig = MoEConfig(),
          data: DataConfig = DataConfig(), oracle: bool = False, on_row=None) -> list[dict]:
    """One row per (variant, active share): evaluate()'s result plus the settings and build time.
    `loaded` is a models.LoadedModel; `heldout` the evaluation token blocks. `on_row(rows)` is
    called after every row (progress). A budget below a variant's floor (its router and shared
    neurons alone) gives a row with "skipped" and the reason instead of results."""
    if not variants:
        raise ConfigError("give at least one variant")
    if not actives or any(not 0 < a <= 1 for a in actives):
        raise ConfigError(f"active shares must be in (0, 1], got {actives}")
    if base.refit_down is not None:
        raise ConfigError("the down refit fits the rows to one active share, and a sweep evaluates each variant at "
                          "several: convert at each share with --refit-down instead")
    configs = [replace(base, method=v.method, router=v.router, shared=v.shared, num_experts=v.experts, expert_size=None,
                       active=max(actives), tau=None) for v in variants]
    family = family_for(loaded.model.config)
    width = family.dense_ffn(family.block_list(loaded.model)[0], loaded.model.config).width
    for cfg in configs:  # every variant checked before the slow profiling
        cfg.validate(width)
    # One profile serves all variants; it records co-activation when any variant groups by it.
    stats = calibrate(loaded.model, loaded.tokenizer, max(configs, key=lambda c: c.method in NEEDS_COACTIVATION), data)
    rows, reference = [], None
    for v, cfg in zip(variants, configs):
        start = time.time()
        m = build(copy.deepcopy(loaded.model), loaded.tokenizer, stats, cfg)
        build_s = time.time() - start
        recall = sum(r["router_recall"] for r in m.record["layers"]) / len(m.record["layers"])
        if reference is None:  # every variant shares the base model: one dense run for the sweep
            reference = dense_reference(m, heldout)
        for active in sorted(actives):
            row = {"variant": v.label(), **v.__dict__, "active_target": active, "build_s": build_s,
                   "router_recall_at_max_active": recall}
            try:
                m.set_active(active)
            except ConfigError as exc:  # below this variant's floor (router + shared neurons)
                rows.append({**row, "skipped": str(exc)})
            else:
                rows.append({**row, **evaluate(m, heldout, oracle=oracle, reference=reference)})
            if on_row is not None:
                on_row(rows)
    return rows


def quality(r: dict) -> float:
    """The y value of a row: PPL / dense PPL for language models, 1 - cosine to dense for encoders."""
    return r["ppl_ratio"] if "ppl_ratio" in r else 1.0 - r["moe"]["cosine_to_dense"]


def plot(rows: list[dict], path, title: str = ""):
    """Quality (log scale) against FFN MFLOPs per token, one line per variant (dashed: oracle
    routing with the same experts), the dense model as a point."""
    import matplotlib

    rows = measured(rows)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["variant"] for r in rows):
        pts = [r for r in rows if r["variant"] == label]
        x = [r["moe"]["ffn_flops_per_token"] / 1e6 for r in pts]
        line, = ax.plot(x, [quality(r) for r in pts], "o-", label=label)
        if all("oracle" in r for r in pts):
            ax.plot(x, [r["oracle"]["ppl_ratio"] for r in pts], "x--", color=line.get_color(),
                    label=f"{label} (oracle routing)")
    dense = rows[0]["dense"]
    lm = "ppl_ratio" in rows[0]
    if lm:
        ax.plot([dense["ffn_flops_per_token"] / 1e6], [1.0], "k*", markersize=12, label=f"dense (PPL {dense['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("FFN MFLOPs per token (router counted)")
    ax.set_ylabel("held-out PPL / dense PPL" if lm else "1 - cosine to dense (last hidden state)")
    finish_plot(fig, ax, path, title)


def finish_plot(fig, ax, path, title: str):
    """Grid, title and legend, then the figure saved to `path` and closed (sweep and frontier plots)."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measured(rows: list[dict]) -> list[dict]:
    """The rows that were evaluated (not skipped for a budget below the variant's floor)."""
    return [r for r in rows if "skipped" not in r]


def markdown(rows: list[dict]) -> str:
    rows = measured(rows)
    dense = rows[0]["dense"]
    if "ppl_ratio" not in rows[0]:
        lines = ["| variant | active target | cosine to dense | FFN MFLOPs/token | active FFN share |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['active_target']:.3f} | {r['moe']['cosine_to_dense']:.4f} | "
                  f"{r['moe']['ffn_flops_per_token'] / 1e6:.1f} | {r['moe']['active_ffn_share']:.1%} |" for r in rows]
        return "\n".join(lines)
    lines = ["| variant | active target | PPL | x dense | oracle x dense | FFN MFLOPs/token | active FFN share |",
             "|---|---|---|---|---|---|---|",
             f"| dense | 1.00 | {dense['ppl']:.2f} | 1.00 | - | {dense['ffn_flops_per_token'] / 1e6:.1f} | 100% |"]
    for r in rows:
        o = f"{r['oracle']['ppl_ratio']:.2f}" if "oracle" in r else "-"
        lines.append(f"| {r['variant']} | {r['active_target']:.3f} | {r['moe']['ppl']:.2f} | {r['ppl_ratio']:.2f} | {o} | "
                     f"{r['moe']['ffn_flops_per_token'] / 1e6:.1f} | {r['moe']['active_ffn_share']:.1%} |")
    return "\n".join(lines)
