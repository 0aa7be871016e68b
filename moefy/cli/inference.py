"""`moefy analyze pregate | offload | core`: inference-system analyses of a converted model
(issue #7: pre-gating, expert offloading with a cache, core experts). Registered on cli.py's
`analyze` group; same conventions (one `error:` line and exit code 2 on bad input, atomic JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moefy.cli.common import OVERWRITE_JSON, RESULT_JSON, THREADS, VERBOSE, open_run, run_command, setup_logging
from moefy.errors import ConfigError


def _moe_config(m):
    """The conversion's MoEConfig (router width, loss, steps, seed), from the run's record."""
    from dataclasses import fields

    from moefy.config import MoEConfig

    saved = m.record.get("moe", {})
    return MoEConfig(**{f.name: saved[f.name] for f in fields(MoEConfig) if f.name in saved})


def _blocks(source, tokenizer, seq_len, tokens):
    from moefy.pipeline import data as data_mod

    return data_mod.blocks(source, tokenizer, seq_len, max_tokens=tokens)


def _check_actives(actives):
    for a in actives:
        if not 0 < a <= 1:
            raise ConfigError(f"active share must be in (0, 1], got {a}")


def pregate_cmd(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert` (mlp routers)."),
    active: list[float] = typer.Option([0.5, 0.25], help="FFN compute shares to compare at; repeat the flag."),
    calib: str = typer.Option("wiki-sample", help="Text the pre-gated routers are trained on."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    data: str = typer.Option("wiki-sample:heldout", help="Held-out text."),
    tokens: int = typer.Option(8192, help="Held-out tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    out: Optional[Path] = typer.Option(None, help="Also save the pre-gated model here."),
    json_out: Optional[Path] = RESULT_JSON,
    overwrite: bool = typer.Option(False, help="Replace existing --out / --json."),
    verbose: bool = VERBOSE,
):
    """Per-layer vs pre-gated routers (each layer's router reads the previous layer's input) on the same experts."""
    setup_logging(verbose)

    def body():
        from moefy.studies import pregate
        from moefy import save
        from moefy.io import check_target, write_json

        _check_actives(active)
        if out is not None:
            check_target(out, overwrite)
        m = open_run(run, json_out, overwrite)
        if any(not layer._mlp_router for layer in m.layers) or m.layers[-1].router_input == "previous":
            raise ConfigError(f"{run} needs per-layer mlp routers (convert --router mlp --router-input own)")
        calib_blocks = _blocks(calib, m.tokenizer, seq_len, calib_tokens)
        heldout = _blocks(data, m.tokenizer, seq_len, tokens)
        result, pre = pregate.analyse(m, calib_blocks, heldout, active, _moe_config(m), progress=True)
        result.update(run=str(run), data=data, calib=calib)
        for row in result["rows"]:
            o, p = row["own"], row["pregated"]
            typer.echo(f"active {row['active_target']:g}: dense {row['dense_ppl']:.3f}, oracle {row['oracle']['ppl']:.3f}; "
                       f"per-layer router PPL {o['ppl']:.3f} (recall {o['router_recall']:.1%}), pre-gated "
                       f"{p['ppl']:.3f} (recall {p['router_recall']:.1%}); pre-gated picks {row['agreement']:.1%} "
                       "of the per-layer router's experts")
        if out is not None:
            pre.set_active(pre.record["moe"].get("active") or active[0])
            save(pre, out, overwrite=overwrite)
            typer.echo(f"saved {out}")
        if json_out is not None:
            write_json(json_out, result)

    run_command(body)


def offload_cmd(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    cache: list[float] = typer.Option([1.0, 2.0, 4.0], help="Cache slots per layer as a multiple of its top-k; repeat."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN share."),
    data: str = typer.Option("wiki-sample:heldout", help="Text the prompts are cut from."),
    prompts: int = typer.Option(2, help="Prompts (greedy decode of each)."),
    prompt_len: int = typer.Option(128, help="Tokens per prompt."),
    new_tokens: int = typer.Option(64, help="Tokens generated per prompt."),
    lookahead_from: Optional[Path] = typer.Option(None, help="Per-layer-router models: take the lookahead's pre-gated "
                                                          "routers from this pre-gated folder with the same experts "
                                                          "(`analyze pregate --out`) instead of training them."),
    calib: str = typer.Option("wiki-sample", help="Per-layer-router models: text the lookahead's pre-gated routers "
                                                  "are trained on."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens for those routers."),
    store_dir: Path = typer.Option(Path("."), help="Folder for the temporary expert file (the slow tier); "
                                                  "on a tmpfs reads cannot bypass the page cache."),
    threads: int = THREADS,
    json_out: Optional[Path] = RESULT_JSON,
    overwrite: bool = OVERWRITE_JSON,
    verbose: bool = VERBOSE,
):
    """Experts offloaded to a file (read with O_DIRECT) behind per-layer caches: LRU vs LRU + pre-gated lookahead."""
    setup_logging(verbose)

    def body():
        import torch

        from moefy.studies import offload, pregate
        from moefy.io import write_json

        if any(c < 1 for c in cache):
            raise ConfigError("--cache must be at least 1 (the top-k experts of a token must fit)")
        if not store_dir.is_dir():
            raise ConfigError(f"--store-dir {store_dir} is not a folder")
        torch.set_num_threads(threads)
        m = open_run(run, json_out, overwrite, active=active)
        blocks = _blocks(data, m.tokenizer, prompt_len, prompts * prompt_len)
        if len(blocks) < prompts:
            raise ConfigError(f"{data} gives only {len(blocks)} prompts of {prompt_len} tokens")
        if m.layers[-1].router_input == "previous":
            predictors = [None] * len(m.layers)  # the model's own pre-gated routers: exact lookahead
        elif lookahead_from is not None:
            predictors = [None] + [layer.router for layer in _same_experts(m, lookahead_from).layers[1:]]
        else:
            calib_blocks = _blocks(calib, m.tokenizer, 256, calib_tokens)
            trained = pregate.train_routers(m, pregate.dense_inputs(m, calib_blocks), _moe_config(m))
            predictors = [None] + [r for r, _ in trained]
        result = offload.analyse(m, blocks[:prompts], new_tokens, cache, predictors, store_dir)
        result.update(run=str(run), data=data, threads=threads)
        s = result["store"]
        typer.echo(f"slow tier: {s['us_per_expert']:.0f} us per expert read ({s['mb_s']:.0f} MB/s, "
                   f"O_DIRECT {s['o_direct']}); resident decode {result['resident_tok_s']:.2f} tok/s, same tokens as "
                   f"offloaded for {result['resident_agreement']:.0%} of the steps")
        for r in result["rows"]:
            typer.echo(f"cache {r['cache_factor']:g}x ({r['capacity_mean']:.0f} slots) {r['policy']:<14} hit rate "
                       f"{r['hit_rate']:.1%}  reads {r['mb_read_per_token']:.1f} MB/token  {r['tok_s']:.2f} tok/s")
        if json_out is not None:
            write_json(json_out, result)

    run_command(body)


def _same_experts(m, folder):
    """The pre-gated model in `folder`, checked to have m's experts."""
    import torch

    from moefy import load

    other = load(folder)
    if other.layers[-1].router_input != "previous":
        raise ConfigError(f"--lookahead-from {folder} is not a pre-gated model (convert --router-input previous)")
    if len(other.layers) != len(m.layers) or any(not torch.equal(a.expert_neurons, b.expert_neurons)
                                                 for a, b in zip(m.layers, other.layers)):
        raise ConfigError(f"--lookahead-from {folder} has other experts than the model; pre-gate this model "
                          "(`moefy analyze pregate RUN --out`)")
    return other


def core_cmd(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN share."),
    data: str = typer.Option("wiki-sample:heldout", help="Held-out text, cut into prompt + continuation blocks."),
    prompts: int = typer.Option(32, help="Blocks scored."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per block."),
    cont_len: int = typer.Option(128, help="Continuation tokens scored per block."),
    budget: str = typer.Option("flops", help="Core experts per layer: flops (top-k plus what the router's FLOPs "
                                             "pay for) or k (top-k)."),
    speed_tokens: int = typer.Option(128, help="Greedy decode tokens for the speed comparison (0: skip)."),
    rounds: int = typer.Option(3, help="Interleaved speed rounds."),
    threads: int = THREADS,
    json_out: Optional[Path] = RESULT_JSON,
    overwrite: bool = OVERWRITE_JSON,
    verbose: bool = VERBOSE,
):
    """Core experts (CoreInfer): each prompt's most-selected experts, fixed for the whole decode, vs per-token routing."""
    setup_logging(verbose)

    def body():
        import torch

        from moefy.studies import core
        from moefy.io import write_json

        if budget not in ("flops", "k"):
            raise ConfigError(f"unknown --budget {budget!r}; choose flops or k")
        if prompt_len < 1 or cont_len < 2:
            raise ConfigError("--prompt-len must be at least 1 and --cont-len at least 2")
        torch.set_num_threads(threads)
        m = open_run(run, json_out, overwrite, active=active)
        if not m.family.causal:
            raise ConfigError(f"{run} is not a causal LM; core experts are chosen for generation")
        blocks = _blocks(data, m.tokenizer, prompt_len + cont_len, prompts * (prompt_len + cont_len))
        result = {**core.evaluate(m, blocks[:prompts], prompt_len, budget), "run": str(run), "data": data}
        p = result["ppl"]
        typer.echo(f"{result['prompts']} prompts of {prompt_len} tokens, {cont_len} scored continuation tokens each: "
                   f"PPL dense {p['dense']:.3f}, per-token routing {p['routed']:.3f}, core experts {p['core']:.3f} "
                   f"({result['core_k_mean']:.1f} core vs top-{result['top_k_mean']:.1f})")
        if speed_tokens:
            speed = core.decode_speed(m, blocks[:1, :prompt_len], speed_tokens, rounds, budget)
            result["decode"] = speed
            typer.echo("decode tok/s: " + ", ".join(f"{k} {v['tok_s']:.2f}" for k, v in speed.items()))
        if json_out is not None:
            write_json(json_out, result)

    run_command(body)
