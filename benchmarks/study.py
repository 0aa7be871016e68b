"""What the studies under benchmarks/ share: SmolLM2 with held-out blocks and their dense
perplexity, a sketch-router model converted on the default calibration, a timed perplexity, and
the JSON file each writes. The studies measure the sketch without sketched experts
(router_approx 0) unless they say otherwise, so their tables stay comparable."""

from __future__ import annotations

import json
import time

import torch

from moefy.pipeline import data as data_mod
from moefy.pipeline import load as models
from moefy.config import DataConfig, MoEConfig
from moefy.pipeline.build import build
from moefy.pipeline.calibrate import calibrate
from moefy.eval.evaluate import perplexity


def smollm(data: str = "wiki-sample:heldout", tokens: int = 4096):
    """(loaded SmolLM2, held-out blocks of 256 tokens, dense perplexity on them)."""
    loaded = models.load("smollm2-135m")
    heldout = data_mod.blocks(data, loaded.tokenizer, 256, max_tokens=tokens)
    with torch.no_grad():
        dense = perplexity(loaded.model, heldout)[0]
    return loaded, heldout, dense


def convert(loaded, **moe):
    """The model converted with MoEConfig(**moe) on the default calibration (wiki-sample)."""
    cfg = MoEConfig(**moe)
    return build(loaded.model, loaded.tokenizer, calibrate(loaded.model, loaded.tokenizer, cfg, DataConfig()), cfg)


def sketch_model(loaded, experts: int = 1536, shared: float = 0.0, reuse: bool = True, approx: float = 0.0):
    """A sketch-router model of one-neuron experts (by default), converted as `convert` does."""
    return convert(loaded, num_experts=experts, shared=shared, router="sketch", router_reuse=reuse,
                   router_approx=approx)


def add_data_args(ap, calib_tokens: int):
    """The data options the masked studies share: --calib-tokens, --tokens, --data, --out."""
    ap.add_argument("--calib-tokens", type=int, default=calib_tokens)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--data", default="wiki-sample:heldout")
    ap.add_argument("--out", required=True)


def sketch_setup(args):
    """(loaded SmolLM2, held-out blocks, dense perplexity, calibration blocks, sketch model) for
    the options of add_data_args; calibration is wiki-sample:calib."""
    loaded, heldout, dense = smollm(args.data, args.tokens)
    calib = data_mod.blocks("wiki-sample:calib", loaded.tokenizer, 256, max_tokens=args.calib_tokens)
    return loaded, heldout, dense, calib, sketch_model(loaded)


def timed_perplexity(model, heldout) -> tuple[float, float]:
    """(perplexity, seconds) of model on the held-out blocks."""
    start = time.time()
    with torch.no_grad():
        ppl = perplexity(model, heldout)[0]
    return ppl, time.time() - start


def add_saved_model_args(ap):
    """The refit studies' options: --model (a saved 25% model), --calib-tokens, --tokens, --data
    (both domains), --out."""
    ap.add_argument("--model", default="runs/smol-a25")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--data", nargs="+", default=["wiki-sample:heldout", "pydoc:heldout"])
    ap.add_argument("--out", required=True)


def saved_with_data(args, dense_ppl: dict):
    """The refit studies' setup: (the saved model args.model, args.calib_tokens of wiki-sample:calib,
    {name: args.tokens held-out blocks of each args.data}); each data set's dense perplexity is
    measured once, into dense_ppl (the model is loaded afresh for every setting)."""
    from moefy import io

    m = io.load(args.model)
    calib = data_mod.blocks("wiki-sample:calib", m.tokenizer, 256, max_tokens=args.calib_tokens)
    sets = {d: data_mod.blocks(d, m.tokenizer, 256, max_tokens=args.tokens) for d in args.data}
    for d, blocks in sets.items():
        if d not in dense_ppl:
            with m.all_experts():
                dense_ppl[d] = timed_perplexity(m.model, blocks)[0]
    return m, calib, sets


def score_sets(m, sets: dict, dense_ppl: dict, row: dict) -> list[dict]:
    """One row per held-out set: `row` plus perplexity, its ratio to dense and the measured share."""
    from moefy.eval.evaluate import compute

    rows = []
    for d, blocks in sets.items():
        for layer in m.layers:
            layer.reset_counters()
        ppl, _ = timed_perplexity(m.model, blocks)
        rows.append({**row, "data": d, "ppl": ppl, "dense_ppl": dense_ppl[d], "ppl_ratio": ppl / dense_ppl[d],
                     "active_measured": compute(m)["active_ffn_share"]})
        print({k: v for k, v in rows[-1].items() if k != "layers"}, flush=True)
    return rows


def write(path: str, dense: float, heldout: torch.Tensor, rows: list, args=None):
    """The study's JSON: dense perplexity, scored tokens, its rows and (when given) its arguments."""
    out = {"dense_ppl": dense, "tokens": int(heldout[:, 1:].numel()), "rows": rows}
    if args is not None:
        out["args"] = vars(args)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
