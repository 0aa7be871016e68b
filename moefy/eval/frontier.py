"""The speed frontier: for each preset, one model converted and measured side by side with the
dense model in one run: held-out perplexity on two domains, the cost the decode path executes, and
wall-clock decode and prefill speed (moefy.eval.bench). Plotted as perplexity ratio against the
measured decode speedup, with the dense point and, per preset, the bandwidth ceiling: the decode
speedup if time followed the weight bytes read per token (every other weight read as dense).
"""

from __future__ import annotations

from moefy import presets
from moefy.eval import bench
from moefy.eval.evaluate import evaluate
from moefy.eval.sweep import finish_plot
from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.pipeline.convert import convert

DOMAINS = ("wiki-sample:heldout", "pydoc:heldout")


def frontier(model: str, names: list[str], *, calib_tokens: int | None = None, eval_tokens: int = 4096,
             domains: tuple[str, ...] = DOMAINS, timing: dict | None = None, on_row=None) -> list[dict]:
    """One row per preset: its perplexity ratio on each domain, executed cost, decode and prefill
    speed against dense, memory, and the bandwidth ceiling. `timing`: bench.run's settings
    (threads, rounds, ...; defaults below). `on_row(row)` after each preset."""
    recipes = [presets.get(name) for name in names]  # every name checked before any work
    rows = []
    for recipe in recipes:
        loaded = models.load(model)  # convert() swaps the FFNs in place: a fresh copy per preset
        data = recipe.data_config(tokens=calib_tokens)
        m = convert(loaded, moe=recipe.moe_config(), data=data)
        row = {"preset": recipe.name, "quality": {}}
        for domain in domains:
            blocks = data_mod.blocks(domain, m.tokenizer, 256, max_tokens=eval_tokens)
            r = evaluate(m, blocks)
            row["quality"][domain] = {"ppl": r["moe"]["ppl"], "dense_ppl": r["dense"]["ppl"],
                                      "ppl_ratio": r["ppl_ratio"], "tokens": r["tokens"]}
        row["executed"] = r["moe"]["executed"]
        row["speed"] = _speed(m, timing or {})
        row["ceiling"] = bandwidth_ceiling(m, row["executed"])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _speed(m, timing: dict) -> dict:
    settings = dict(input_len=128, output_len=128, batch_size=1, warmup=5, iters=20, rounds=3, threads=1,
                    prefill_tokens=2048, prefill_layers=4)
    settings.update(timing)
    seq = max(settings["input_len"], settings["prefill_tokens"] // 8)
    blocks = data_mod.blocks(DOMAINS[0], m.tokenizer, seq, max_tokens=8 * seq, min_tokens=8 * seq)
    result = bench.run(m, blocks, **settings)
    keep = ("decode", "prefill", "prefill_long", "memory", "ffn_batch1", "cpu_flags", "threads", "load_avg_1m")
    return {k: result[k] for k in keep if k in result}


def bandwidth_ceiling(m, executed: dict) -> float:
    """Dense decode time / MoE decode time if a token's time were its weight bytes: all weights
    read once (a tied embedding and head counted once), the FFNs at their executed bytes."""
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in m.model.parameters()}.values())
    ffn = sum(p.numel() * p.element_size() for layer in m.layers for p in layer.parameters())
    dense = total - ffn + executed["dense_bytes_per_token"]
    return dense / (dense - executed["dense_bytes_per_token"] + executed["decode_bytes_per_token"])


def markdown(rows: list[dict]) -> str:
    """The frontier as a table: perplexity ratios, bytes, decode and prefill speed, memory."""
    domains = list(rows[0]["quality"]) if rows else []
    head = ["preset", *[f"{d} (x dense)" for d in domains], "FFN bytes (router)", "decode (x dense)",
            "bandwidth ceiling", "prefill 128 (MoE/dense)", "memory (MoE/dense)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        x, s = r["executed"], r["speed"]
        cells = [r["preset"], *[f"{r['quality'][d]['ppl_ratio']:.3f}" for d in domains],
                 f"{x['executed_bytes_share']:.1%} ({x['router_bytes_share']:.1%})",
                 f"{s['decode']['speedup']:.2f}x", f"{r['ceiling']:.2f}x", f"{s['prefill']['ratio']:.2f}",
                 f"{s['memory']['moe_mb'] / s['memory']['dense_mb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = ""):
    """Perplexity ratio (first domain, log scale) against measured decode speedup; the dense point;
    each preset's bandwidth ceiling as an open marker at the same perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([1.0], [1.0], "k*", markersize=12, label="dense")
    for r in rows:
        domain = next(iter(r["quality"]))
        y = r["quality"][domain]["ppl_ratio"]
        point, = ax.plot([r["speed"]["decode"]["speedup"]], [y], "o", label=r["preset"])
        ax.plot([r["ceiling"]], [y], "o", mfc="none", color=point.get_color())
        ax.plot([r["speed"]["decode"]["speedup"], r["ceiling"]], [y, y], ":", color=point.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("decode speedup over dense (time per new token; open markers: bandwidth ceiling)")
    ax.set_ylabel(f"held-out PPL / dense PPL ({DOMAINS[0]})")
    finish_plot(fig, ax, path, title)


__all__ = ["DOMAINS", "bandwidth_ceiling", "frontier", "markdown", "plot"]
