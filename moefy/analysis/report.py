"""`moefy report`: one page on a converted model, as Markdown (PNG files beside it) and as a
self-contained HTML file (the same page, PNGs embedded as base64).

Sections: the model and its settings; quality vs FFN compute (from a `moefy sweep` JSON, or
measured here at a few --active shares); expert usage heatmaps per layer; routing consistency
(analysis/consistency.py); specialisation by domain (analysis/specialisation.py); Wasserstein
neurons (from a `moefy analyze wasserstein` JSON) and the speed table (from a `moefy bench
--output-json` JSON) when given. Analyses already computed can be passed as their JSON files.
Every number on the page also goes to report.json. The folder is written atomically.

# N layers, E routed experts
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moefy import io
from moefy.model import MoEModel
from moefy.errors import ConfigError

log = logging.getLogger(__name__)

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}code{background:#f5f5f5;padding:0 3px}h1{font-size:1.6em}h2{margin-top:1.6em;
border-bottom:1px solid #ddd}"""


@dataclass
class Inputs:
    """What the page is built from. JSON inputs are the files other moefy commands write."""

    data: list[str] = field(default_factory=lambda: ["wiki-sample:heldout", "pydoc:heldout"])
    tokens: int = 8192               # tokens per domain for the routing analyses
    seq_len: int = 512               # tokens per block for the routing analyses (>= the longest segment)
    eval_tokens: int = 8192          # held-out tokens for the quality points
    eval_seq_len: int = 256          # tokens per block for the quality points (as `moefy eval`)
    actives: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # quality points, FFN share
    segments: list[int] = field(default_factory=lambda: [4, 16, 64, 256])  # consistency: segment lengths, tokens
    ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # consistency: cache sizes / k
    sweep: dict | None = None        # `moefy sweep` sweep.json: its rows replace the measured points
    bench: dict | None = None        # `moefy bench --output-json`
    wasserstein: dict | None = None  # `moefy analyze wasserstein --json`
    consistency: dict | None = None  # `moefy analyze consistency --json`
    specialisation: dict | None = None  # `moefy analyze specialisation --json`


def read_json(path, what: str) -> dict:
    """A JSON input, or one clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the {what} JSON {path}: {exc}".splitlines()[0]) from exc


def check(inputs: Inputs):
    """Every input checked before any slow work."""
    from moefy.analysis import consistency

    if not inputs.data:
        raise ConfigError("give at least one --data text")
    if not inputs.actives or any(not 0 < a <= 1 for a in inputs.actives):
        raise ConfigError(f"active shares must be in (0, 1], got {inputs.actives}")
    needs = {"sweep": ("rows",), "bench": ("decode",), "wasserstein": ("layers",),
             "consistency": ("segments", "layers", "model"), "specialisation": ("domains", "layers", "by_depth")}
    for name, keys in needs.items():
        obj = getattr(inputs, name)
        if obj is not None and not (isinstance(obj, dict) and all(k in obj for k in keys)):
            raise ConfigError(f"the --{name} JSON is not what `moefy {_command(name)}` writes (no {', '.join(keys)})")
    if inputs.consistency is None:
        consistency.check(inputs.seq_len, inputs.segments, inputs.ratios)


def _command(name: str) -> str:
    return {"sweep": "sweep", "bench": "bench --output-json", "wasserstein": "analyze wasserstein",
            "consistency": "analyze consistency", "specialisation": "analyze specialisation"}[name]


def build(m: MoEModel, name: str, inputs: Inputs, out, overwrite: bool = False) -> Path:
    """Measure what is missing, draw the figures and write report.md, report.html, report.json
    and the PNGs into the folder `out` (atomically)."""
    out = Path(out)
    io.check_target(out, overwrite)
    check(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the published folder private
        page = Page(tmp)
        numbers = {"model": name, "settings": settings(m)}
        page.add(f"# moefy report: {name}", overview(m, name))
        numbers["quality"] = quality_section(page, m, inputs)
        numbers.update(routing_sections(page, m, inputs))
        if inputs.wasserstein is not None:
            wasserstein_section(page, inputs.wasserstein)
        if inputs.bench is not None:
            page.add("## Speed (`moefy bench`)", bench_table(inputs.bench))
            numbers["bench"] = inputs.bench
        page.write(numbers)
        io.replace_path(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


class Page:
    """Markdown blocks and the PNGs they show, written as report.md / report.html."""

    def __init__(self, folder: Path):
        self.folder, self.blocks = folder, []

    def add(self, *blocks: str):
        self.blocks.extend(b for b in blocks if b)

    def figure(self, filename: str, draw, alt: str) -> str:
        """Draw a figure into the folder (draw(path)) and return its Markdown."""
        draw(self.folder / filename)
        return f"![{alt}]({filename})"

    def write(self, numbers: dict):
        md = "\n\n".join(self.blocks) + "\n"
        (self.folder / "report.md").write_text(md)
        (self.folder / "report.html").write_text(self.html(md))
        (self.folder / "report.json").write_text(json.dumps(numbers, indent=1))

    def html(self, md: str) -> str:
        """The same page as one HTML file: Markdown rendered by markdown-it, PNGs inlined."""
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark").enable("table").render(md)

        def inline(match):
            data = base64.b64encode((self.folder / match.group(1)).read_bytes()).decode()
            return f'src="data:image/png;base64,{data}"'

        body = re.sub(r'src="([^"/]+\.png)"', inline, body)
        title = self.blocks[0].lstrip("# ") if self.blocks else "moefy report"
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
                f"<style>{CSS}</style></head><body>\n{body}</body></html>\n")


# -- sections ----------------------------------------------------------------------------------


def settings(m: MoEModel) -> dict:
    layers = m.layers
    return {"moe": m.record.get("moe", {}), "source": m.record.get("source"),
            "calibration": m.record.get("calibration", {}),
            "top_k": [l.top_k for l in layers], "tau": layers[0].tau,
            "experts": [l.spec["num_experts"] for l in layers], "shared": [l.spec["shared"] for l in layers],
            "expert_size": layers[0].spec["expert_size"]}


def overview(m: MoEModel, name: str) -> str:
    s = settings(m)
    moe, layers = s["moe"], m.layers
    ks = sorted(set(s["top_k"]))
    k = f"top-k {ks[0]}" if len(ks) == 1 else f"top-k {min(ks)}-{max(ks)} by layer"
    sel = f"dynamic-k, tau {s['tau']}" if s["tau"] is not None else k
    recall = [r.get("router_recall") for r in m.record.get("layers", []) if r.get("router_recall") is not None]
    lines = [f"- base model: `{Path(str(s['source'])).name}` ({m.family.name}, {len(layers)} FFN layers)",
             f"- experts: {s['experts'][0]} routed experts of {s['expert_size']} neurons per layer, "
             f"{s['shared'][0]} shared neurons; grouping `{moe.get('method')}`, router `{moe.get('router')}`"
             + (f" ({moe.get('router_loss')})" if moe.get("router") == "mlp" else ""),
             f"- routing as saved: {sel} (target active share {moe.get('active')}, budget {moe.get('budget', 'uniform')})",
             f"- calibration: {s['calibration'].get('source')}, {s['calibration'].get('tokens_used')} tokens"]
    if recall:
        lines.append(f"- router recall of the oracle's experts on calibration inputs: {sum(recall) / len(recall):.1%} "
                     "(mean over layers)")
    return "\n".join(lines)


def quality_section(page: Page, m: MoEModel, inputs: Inputs) -> list[dict]:
    """Quality vs FFN compute: the sweep's rows, or this model at each --active share."""
    from moefy.eval import sweep as sweep_mod

    if inputs.sweep is not None:
        rows, where = inputs.sweep["rows"], inputs.sweep.get("eval_data", "")
        source = (f"from the `moefy sweep` JSON given (variants built from `{Path(str(inputs.sweep.get('model'))).name}` "
                  f"on {inputs.sweep.get('calib', '?')}, not this folder)")
    else:
        rows, where = measure_quality(m, inputs), inputs.data[0]
        source = f"measured here at each target share on {inputs.eval_tokens} tokens of {where}"
    if not sweep_mod.measured(rows):
        page.add("## Quality vs compute", "No measured point (every budget was below the variants' floors).")
        return rows
    fig = page.figure("quality.png", lambda p: sweep_mod.plot(rows, p, title=f"quality vs FFN compute, {where}"),
                      "quality vs compute")
    page.add("## Quality vs compute", f"Held-out quality against FFN FLOPs per token (router counted), {source}. "
             "Dashed: the same experts with oracle routing, where measured.", fig, sweep_mod.markdown(rows))
    return rows


def measure_quality(m: MoEModel, inputs: Inputs) -> list[dict]:
    """This model at each active share, rows in `moefy sweep`'s format; its saved routing is restored."""
    from moefy.pipeline.data import blocks
    from moefy.eval.evaluate import dense_reference, evaluate

    heldout = blocks(inputs.data[0], m.tokenizer, inputs.eval_seq_len, max_tokens=inputs.eval_tokens)
    saved = [(layer.top_k, layer.tau) for layer in m.layers]
    rows, reference = [], dense_reference(m, heldout)
    label = "this model"
    try:
        for share in sorted(inputs.actives):
            row = {"variant": label, "active_target": share}
            try:
                m.set_active(share)
            except ConfigError as exc:
                rows.append({**row, "skipped": str(exc)})
                continue
            rows.append({**row, **evaluate(m, heldout, reference=reference)})
            log.info("quality at %s: %s", share, rows[-1].get("ppl_ratio"))
    finally:
        for layer, (k, tau) in zip(m.layers, saved):
            layer.set_selection(k, tau)
    return rows


def routing_sections(page: Page, m: MoEModel, inputs: Inputs) -> dict:
    """Usage heatmaps, routing consistency and specialisation, from one routing pass per domain
    (none for an analysis given as JSON)."""
    from moefy.analysis import consistency, routes, specialisation
    from moefy.pipeline.data import blocks

    if inputs.specialisation is None and len(inputs.data) >= 2:
        wanted = inputs.data[:2]  # specialisation, and consistency and usage from the first
    elif inputs.consistency is None or inputs.specialisation is None:
        wanted = inputs.data[:1]  # consistency and / or the usage heatmap
    else:
        wanted = []  # both given: the heatmaps come from the specialisation JSON
    masks = {spec: routes.routing_masks(m, blocks(spec, m.tokenizer, inputs.seq_len, max_tokens=inputs.tokens))
             for spec in wanted}
    spec_result = inputs.specialisation
    if spec_result is None and len(masks) == 2:
        spec_result = specialisation.analyse(masks)
    if spec_result is not None:  # the heatmaps from the same tokens as the specialisation
        usage = {d: torch.tensor([r["usage"][d] for r in spec_result["layers"]]) for d in spec_result["domains"]}
        where = "on " + " and ".join(f"{n} tokens of {d}" for d, n in spec_result["tokens"].items())
    else:
        usage = {spec: routes.usage(ms) for spec, ms in masks.items()}
        where = f"on {inputs.tokens} tokens of {inputs.data[0]}"
    balanced = ""
    if all(l.top_k is not None and l.tau is None for l in m.layers):
        share = sum(l.top_k / l.spec["num_experts"] for l in m.layers) / len(m.layers)
        balanced = f" Perfectly balanced routing would put every expert at k / E = {share:.2f}."
    fig = page.figure("usage.png", lambda p: usage_plot(usage, p), "expert usage heatmaps")
    page.add("## Expert usage", f"Share of tokens that select each routed expert, per layer, experts sorted by "
             f"usage within each layer, {where} (the model's saved routing).{balanced}", fig, usage_table(usage))
    numbers = {"usage": {spec: {"layers": usage_summary(u)} for spec, u in usage.items()}}

    result = inputs.consistency
    if result is None:
        result = {"data": inputs.data[0], **consistency.analyse(masks[inputs.data[0]], inputs.segments, inputs.ratios)}
    numbers["consistency"] = result
    fig = page.figure("consistency.png", lambda p: consistency.plot(result, p), "routing consistency")
    page.add("## Routing consistency (moe-lrc)",
             f"On {result['tokens']} tokens of {result.get('data', '')} in blocks of {result['seq_len']}. "
             "SRP: the best F1 of one fixed expert set per m-token segment against the per-token choices "
             "(size ratio: the experts it then selects per token relative to k); SRP shuffled: the same with the "
             "tokens in random order. SCH: hit rate of an ideal cache of rho x k experts that evicts the experts "
             "used least in the rest of the segment; LRU: a plain LRU cache of the same size. Means over layers.",
             fig, consistency.markdown(result))

    if spec_result is None:
        page.add("## Specialisation by domain", "Not computed: give two --data texts.")
        return numbers
    numbers["specialisation"] = spec_result
    a, b = spec_result["domains"]
    fig = page.figure("specialisation.png", lambda p: specialisation.plot(spec_result, p), "specialisation")
    page.add("## Specialisation by domain",
             f"{a} vs {b}: which experts each domain's tokens select, compared per layer; in brackets and dotted "
             "the same comparison between two halves of one domain (the noise floor). Jaccard of each domain's "
             "top-k experts; Jensen-Shannon divergence (base 2) and total variation between the usage "
             f"distributions; the share of each domain's selections that {a}'s top-k set holds; experts "
             "selected at least twice as often in one domain (among those used by 1% of tokens).",
             fig, specialisation.markdown(spec_result))
    return numbers


def usage_summary(u: torch.Tensor) -> list[dict]:
    rows = []
    for i, freq in enumerate(u):
        freq = freq[~freq.isnan()]
        top = freq.sort(descending=True).values
        n10 = max(1, round(0.1 * len(top)))
        rows.append({"layer": i, "max": float(top[0]), "unused": int((freq < 1e-3).sum()),
                     "top10_share": float(top[:n10].sum() / top.sum())})
    return rows


def usage_table(usage: dict) -> str:
    """Per domain: experts almost never used (< 0.1% of tokens) and the top 10%'s share, by depth."""
    lines = ["| data | layers | experts used by < 0.1% of tokens | share of selections to the top 10% of experts |",
             "|---|---|---|---|"]
    for spec, u in usage.items():
        rows = usage_summary(u)
        for idx in _thirds(len(rows)):
            part = [rows[i] for i in idx]
            lines.append(f"| {spec} | {idx[0]}-{idx[-1]} | {_mean([r['unused'] for r in part]):.1f} | "
                         f"{_mean([r['top10_share'] for r in part]):.1%} |")
    return "\n".join(lines)


def usage_plot(usage: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usage), figsize=(7.2 * len(usage), 4.4), squeeze=False)
    for ax, (spec, u) in zip(axes[0], usage.items()):
        sorted_u = u.nan_to_num(-1).sort(dim=1, descending=True).values.clamp_min(0)
        im = ax.imshow(sorted_u.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set(xlabel="experts, by usage within the layer", ylabel="layer", title=spec)
        fig.colorbar(im, ax=ax, label="share of tokens selecting the expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wasserstein_section(page: Page, result: dict):
    from moefy.analysis import wasserstein

    distances = [torch.tensor(r["w1"]) for r in result["layers"]]
    fig = page.figure("wasserstein.png", lambda p: wasserstein.plot(distances, p), "Wasserstein neurons")
    lines = ["| layers | mean W1 | p90 | max |", "|---|---|---|---|"]
    for idx in _thirds(len(result["layers"])):
        rows = [result["layers"][i] for i in idx]
        lines.append(f"| {idx[0]}-{idx[-1]} | {_mean([r['mean'] for r in rows]):.3f} | "
                     f"{_mean([r['p90'] for r in rows]):.3f} | {max(r['max'] for r in rows):.3f} |")
    text = ("W1 distance of each dense FFN neuron's standardised pre-activation to N(0, 1), on "
            f"{result.get('calibration', {}).get('tokens', '?')} calibration tokens (`moefy analyze wasserstein` on "
            f"`{Path(str(result.get('source', '?'))).name}`).")
    e = result.get("experiment")
    if e:
        text += (f" Input rows of {e['share']:.0%} of each layer's neurons pruned to {e['sparsity']:.0%}: perplexity "
                 f"{e['top_ppl']:.2f} for the highest-W1 neurons, {e['bottom_ppl']:.2f} for the lowest, "
                 f"{e['random_ppl']:.2f} at random (dense {e['dense_ppl']:.2f}).")
    page.add("## Wasserstein neurons", text, fig, "\n".join(lines))


def bench_table(b: dict) -> str:
    """`moefy bench`'s JSON as a table: FFN stacks, prefill and decode, dense vs MoE."""
    lines = ["| benchmark | dense | MoE | MoE / dense |", "|---|---|---|---|"]
    for key, label in (("ffn_batch1", "FFN stack, 1 token"), ("ffn_prefill", "FFN stack, prefill"),
                       ("prefill", "model prefill")):
        r = b.get(key)
        if r:
            n = r.get("tokens", "?")
            what = f"{label} ({n} token{'' if n == 1 else 's'}" + (f", {r['layers']} layers)" if "layers" in r else ")")
            lines.append(f"| {what} | {r['dense_ms']:.2f} ms | {r['moe_ms']:.2f} ms | {r['ratio']:.2f} |")
    d = b.get("decode")
    if d:
        lines.append(f"| greedy decode ({d['input_len']} + {d['output_len']} tokens, batch {d['batch_size']}) | "
                     f"{d['dense_tok_s']:.1f} tok/s | {d['moe_tok_s']:.1f} tok/s | {d['speedup']:.2f}x faster |")
    w = b.get("weights_mb")
    if w:
        lines.append(f"| weights | {w['dense']:.0f} MB | {w['moe']:.0f} MB | {w['moe'] / w['dense']:.2f} |")
    env = f"{b.get('threads', '?')} thread(s), {b.get('cores', '?')} cores, load {b.get('load_avg_1m', float('nan')):.2f}"
    share = b.get("active_ffn_share")
    return "\n".join(lines) + f"\n\nMeasured with {env}" + (f"; active FFN share {share:.1%}." if share else ".")


def _thirds(n: int) -> list[list[int]]:
    import numpy as np

    return [idx.tolist() for idx in np.array_split(np.arange(n), 3) if len(idx)]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


__all__ = ["Inputs", "build", "read_json", "check"]
