"""`moefy eval | bench | sweep | lm-eval-task`: quality and speed against the dense model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moefy.cli.prune import report_pruned
from moefy.cli.common import (DENSE_PROMPT_FROM, OVERWRITE_JSON, OVERWRITE_OUT, RESULT_JSON, ROUTER_APPROX,
                              ROUTER_CHANNELS, ROUTER_REUSE, ROUTER_THRESHOLD, VERBOSE, open_run, report_eval,
                              run_command, run_info_for, setup_logging)

def eval_cmd(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    data: str = typer.Option("wiki-sample:heldout", help="Evaluation text."),
    tokens: int = typer.Option(8192, help="Evaluation tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN compute share."),
    top_k: Optional[int] = typer.Option(None, help="Override the saved fixed top-k."),
    tau: Optional[float] = typer.Option(None, help="Override with dynamic-k at this threshold."),
    router_channels: Optional[float] = ROUTER_CHANNELS,
    router_approx: Optional[float] = ROUTER_APPROX,
    router_reuse: Optional[bool] = ROUTER_REUSE,
    router_threshold: Optional[bool] = ROUTER_THRESHOLD,
    oracle: bool = typer.Option(False, help="Also score the same experts with perfect routing."),
    json_out: Optional[Path] = RESULT_JSON,
    overwrite: bool = OVERWRITE_JSON,
    verbose: bool = VERBOSE,
):
    """Held-out perplexity and FFN FLOPs of the dense and the MoE model, side by side."""
    setup_logging(verbose)

    def body():
        from moefy.pipeline import data as data_mod

        m = open_run(run, json_out, overwrite, active=active, top_k=top_k, tau=tau, router_channels=router_channels,
                      router_approx=router_approx, router_reuse=router_reuse,
                      router_threshold=router_threshold)
        info = run_info_for(m.record, "eval", run, {"data": data, "tokens": tokens, "seq_len": seq_len, "active": active,
                                                "top_k": top_k, "tau": tau, "router_channels": router_channels,
                                                "router_approx": router_approx, "router_reuse": router_reuse,
                                                "router_threshold": router_threshold, "oracle": oracle})
        if m.record.get("kind") == "sparse_expansion":  # a `moefy prune` folder: no dense copy inside
            return report_pruned(m, data_mod.blocks(data, m.tokenizer, seq_len, max_tokens=tokens), data, json_out,
                                  run=info)
        report_eval(m, data_mod.blocks(data, m.tokenizer, seq_len, max_tokens=tokens), data, json_out, oracle, run=info)

    run_command(body)


def bench(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="Write the result as JSON here."),
    data: str = typer.Option("wiki-sample:heldout", help="Text for the prompt and the captured FFN inputs."),
    input_len: int = typer.Option(128, help="Prompt tokens for generation and prefill."),
    output_len: int = typer.Option(128, help="New tokens generated (greedy, KV cache on)."),
    batch_size: int = typer.Option(1, help="Sequences per generation/prefill call."),
    num_iters_warmup: int = typer.Option(5, help="Warm-up calls per benchmark."),
    num_iters: int = typer.Option(20, help="Timed calls per round (FFN benchmarks)."),
    rounds: int = typer.Option(3, help="Interleaved dense/MoE rounds."),
    threads: int = typer.Option(1, help="torch threads (batch-1 decode is as fast on 1 as on 2 here)."),
    dense_prompt_from: Optional[int] = DENSE_PROMPT_FROM,
    prefill_tokens: int = typer.Option(2048, help="Tokens per FFN prefill call (8 x 256)."),
    prefill_layers: int = typer.Option(4, help="FFN layers in the prefill stack."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN share."),
    router_channels: Optional[float] = ROUTER_CHANNELS,
    router_approx: Optional[float] = ROUTER_APPROX,
    router_reuse: Optional[bool] = ROUTER_REUSE,
    router_threshold: Optional[bool] = ROUTER_THRESHOLD,
    lean: bool = typer.Option(False, help="Also decode with a static KV cache, both models (decode_lean)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --output-json file."),
):
    """Dense vs MoE wall-clock: FFN stacks (batch 1, prefill), greedy decode tokens/s, prefill,
    where a decode step's time goes, memory."""
    setup_logging(False)

    def body():
        import json

        from moefy.eval import bench as bench_mod
        from moefy.pipeline import data as data_mod
        from moefy.io import write_json

        m = open_run(run, output_json, overwrite, active=active, dense_prompt_from=dense_prompt_from,
                     router_channels=router_channels,
                      router_approx=router_approx, router_reuse=router_reuse,
                      router_threshold=router_threshold)
        seq = max(input_len, prefill_tokens // 8)
        blocks = data_mod.blocks(data, m.tokenizer, seq, max_tokens=8 * seq, min_tokens=8 * seq)
        result = bench_mod.run(m, blocks, input_len=input_len, output_len=output_len, batch_size=batch_size,
                               warmup=num_iters_warmup, iters=num_iters, rounds=rounds, threads=threads,
                               prefill_tokens=prefill_tokens, prefill_layers=prefill_layers, lean=lean)
        typer.echo(json.dumps(result, indent=1))
        if output_json is not None:
            write_json(output_json, result, run=run_info_for(m.record, "bench", run, {
                "data": data, "input_len": input_len, "output_len": output_len, "batch_size": batch_size,
                "threads": threads, "prefill_tokens": prefill_tokens, "prefill_layers": prefill_layers,
                "active": active, "lean": lean}))

    run_command(body)


def lm_eval_task_cmd(
    data: str = typer.Argument("wiki-sample:heldout", help="Text: wiki-sample, pydoc (with :heldout ...), .txt or .jsonl."),
    out: Path = typer.Option(..., help="Folder for NAME.yaml and NAME.jsonl (lm_eval --include_path)."),
    name: Optional[str] = typer.Option(None, help="Task name (default: moefy_ + the data spec)."),
    overwrite: bool = OVERWRITE_OUT,
):
    """Write a local lm-evaluation-harness perplexity task over moefy text (no hub needed)."""
    def body():
        from moefy.eval.lm_eval_task import write_task

        folder, task = write_task(data, out, name, overwrite)
        typer.echo(f"wrote {folder}; score a saved folder with:\n  lm_eval --model hf --model_args "
                   f"pretrained=FOLDER,trust_remote_code=True --include_path {folder} --tasks {task}")

    run_command(body)


SWEEP_VARIANT = typer.Option(["coactivation:mlp:0.1:384", "coactivation:mlp:0:96",
     "coactivation:similarity:0.1:96"],
    help="method:router:shared:experts; repeat the flag for several.")
SWEEP_ORACLE = typer.Option(False, help="Also score every point with perfect routing (costs a dense FFN per layer).")


def sweep(
    out: Path = typer.Option(..., help="Output folder: sweep.json, sweep.png and sweep.md."),
    model: str = typer.Option("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    variant: list[str] = SWEEP_VARIANT,
    active: list[float] = typer.Option([0.125, 0.25, 0.375, 0.5, 0.75], help="FFN compute shares; repeat the flag."),
    oracle: bool = SWEEP_ORACLE,
    calib: str = typer.Option("wiki-sample", help="Calibration text."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    eval_data: str = typer.Option("wiki-sample:heldout", help="Held-out text."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    router_loss: str = typer.Option("log-norm", help="mlp router target: log-norm, norm or bce."),
    budget: str = typer.Option("uniform", help="Per-layer top-k: uniform or sensitivity (see convert --help)."),
    seed: int = typer.Option(0),
    overwrite: bool = OVERWRITE_OUT,
    verbose: bool = VERBOSE,
):
    """Quality vs FFN compute for several variants on one model: JSON, a PNG plot and a table."""
    setup_logging(verbose)

    def body():
        from moefy import io
        from moefy.config import DataConfig, MoEConfig
        from moefy.eval import sweep as sweep_mod
        from moefy.pipeline import data as data_mod
        from moefy.pipeline import load as models

        io.check_target(out, overwrite)
        variants = [sweep_mod.Variant.parse(v) for v in variant]
        base = MoEConfig(router_loss=router_loss, seed=seed, budget=budget)
        data_cfg = DataConfig(source=calib, seq_len=seq_len, tokens=calib_tokens)
        data_cfg.validate()
        loaded = models.load(model)
        heldout = data_mod.blocks(eval_data, loaded.tokenizer, seq_len, max_tokens=eval_tokens)
        rows = sweep_mod.sweep(loaded, variants, active, heldout, base, data_cfg, oracle=oracle, on_row=_sweep_row)
        header = {"model": str(loaded.source), "eval_data": eval_data, "calib": calib, "calib_tokens": calib_tokens,
                  "router_loss": router_loss, "seed": seed, "budget": budget}
        settings = {"variants": variant, "active": active, "oracle": oracle, "eval_data": eval_data,
                    "eval_tokens": eval_tokens}
        typer.echo(_write_sweep(out, overwrite, loaded, rows, base, data_cfg, header, settings))
        typer.echo(f"saved {out}/sweep.json, sweep.png, sweep.md, moefy_run.json")

    run_command(body)


def _sweep_row(rows):
    r = rows[-1]
    if "skipped" in r:
        typer.echo(f"{r['variant']} @ {r['active_target']:g}: skipped: {r['skipped']}", err=True)
        return
    from moefy.eval.sweep import quality

    typer.echo(f"{r['variant']} @ {r['active_target']:g}: {quality(r):.3f} "
               f"({r['moe']['active_ffn_share']:.1%} active)", err=True)


def _write_sweep(out, overwrite, loaded, rows, base, data_cfg, header: dict, settings: dict) -> str:
    """sweep.json, moefy_run.json, sweep.png and sweep.md, written together (atomically); the table."""
    import json

    from moefy import io
    from moefy.eval import sweep as sweep_mod
    from moefy.pipeline import data as data_mod
    from moefy.pipeline.calibrate import calibration_record
    from moefy.provenance import RUN_FILE, run_info, weights_hash

    calib_ids = data_mod.blocks(data_cfg.source, loaded.tokenizer, data_cfg.seq_len, max_tokens=data_cfg.tokens)
    with io.staging(out, overwrite, 0) as tmp:
        io.write_json(tmp / "sweep.json", {**header, "versions": io.versions(), "rows": rows})
        (tmp / RUN_FILE).write_text(json.dumps(run_info({
            "source": str(loaded.source), "source_weights": weights_hash(loaded.source, loaded.model),
            "calibration": calibration_record(data_cfg, calib_ids), "moe": base.to_dict(), "settings": settings},
            "sweep"), indent=1))
        sweep_mod.plot(rows, tmp / "sweep.png", title=f"{Path(str(loaded.source)).name}, {header['eval_data']}")
        table = sweep_mod.markdown(rows)
        (tmp / "sweep.md").write_text(table + "\n")
    return table


FRONTIER_PRESET = typer.Option(["balanced", "half", "fast", "teal", "sketch"], "--preset",
                               help="Presets to convert and measure; repeat the flag.")


def frontier_cmd(
    out: Path = typer.Option(..., help="Output folder: frontier.json, frontier.png and frontier.md."),
    model: str = typer.Option("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    preset: list[str] = FRONTIER_PRESET,
    calib_tokens: Optional[int] = typer.Option(None, help="Calibration tokens (default: each preset's)."),
    eval_tokens: int = typer.Option(4096, help="Held-out tokens per domain."),
    threads: int = typer.Option(1, help="torch threads for the timings."),
    rounds: int = typer.Option(3, help="Interleaved dense/MoE rounds per timing."),
    overwrite: bool = OVERWRITE_OUT,
    verbose: bool = VERBOSE,
):
    """The speed frontier: each preset converted, then perplexity on two domains and decode /
    prefill speed against dense, in one run; a table, a plot and the JSON."""
    setup_logging(verbose)

    def body():
        from moefy import io
        from moefy.eval import frontier as frontier_mod

        io.check_target(out, overwrite)
        rows = frontier_mod.frontier(model, preset, calib_tokens=calib_tokens, eval_tokens=eval_tokens,
                                     timing={"threads": threads, "rounds": rounds},
                                     on_row=lambda r: typer.echo(frontier_mod.markdown([r]).splitlines()[-1], err=True))
        table = frontier_mod.markdown(rows)
        with io.staging(out, overwrite, 0) as tmp:
            io.write_json(tmp / "frontier.json", {"model": model, "versions": io.versions(), "rows": rows})
            frontier_mod.plot(rows, tmp / "frontier.png", title=f"{Path(model).name}: perplexity vs decode speed")
            (tmp / "frontier.md").write_text(table + "\n")
        typer.echo(table)
        typer.echo(f"saved {out}/frontier.json, frontier.png, frontier.md")

    run_command(body)
