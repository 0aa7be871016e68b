"""moefy's command line: parses flags, builds configs, calls one library function, renders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from .errors import ConfigError, MoefyError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn a dense transformer into a sparse Mixture-of-Experts model.")


def _run(fn):
    """Run a command body: user errors become one line on stderr and exit code 2."""
    try:
        return fn()
    except MoefyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; the output was not written (a --layerwise convert continues with --resume)", err=True)
        raise typer.Exit(130)


# The sketch-router overrides of eval, tune and bench (applied by _open_run, before --active).
ROUTER_CHANNELS = typer.Option(None, help="Override a sketch router's share of input channels (applied before --active).")
ROUTER_APPROX = typer.Option(None, help="Override a sketch router's approx share (sketched experts; applied before "
                                        "--active).")
ROUTER_REUSE = typer.Option(None, "--router-reuse/--no-router-reuse",
                            help="Override whether a sketch router's selected neurons start from its sums (their "
                                 "FLOPs, so the top-k a share allows, change; applied before --active).")
ROUTER_THRESHOLD = typer.Option(None, "--router-threshold/--router-top-k",
                                help="Override how a sketch router selects: by its score thresholds (a model "
                                     "converted with them) or a fixed top-k.")


@app.command()
def convert(
    model: str = typer.Option("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    calib: str = typer.Option("wiki-sample", help="Calibration text: wiki-sample, pydoc, a .txt or .jsonl file, or a mixture with equal shares (wiki-sample+pydoc)."),
    out: Path = typer.Option(Path("runs/smol-moe"), help="Output folder."),
    experts: int = typer.Option(384, help="Expert slots per FFN (shared slots included); must divide the FFN width."),
    active: Optional[float] = typer.Option(0.5, help="Target share of FFN compute per token, router counted, in (0, 1]."),
    tau: Optional[float] = typer.Option(None, help="Dynamic-k threshold in [0, 1) instead of a fixed top-k."),
    method: str = typer.Option("coactivation", help="Grouping: random, param-kmeans, coactivation."),
    router: str = typer.Option("mlp", help="Router: mlp, sketch (training-free, reads the experts' own weights), "
                                            "similarity, representative."),
    router_loss: str = typer.Option("log-norm", help="mlp router target: log-norm, norm (D2DMoE) or bce (MoEfication)."),
    router_channels: Optional[float] = typer.Option(None, help="sketch router: share of each token's input channels "
                                                               "(largest |x|) it reads, in (0, 1] (default: 0.8 x "
                                                               "the active share, following --active later)."),
    router_reuse: bool = typer.Option(True, help="sketch router: the selected neurons start from the sketch's sums "
                                                 "and add only the products it left out (fewer FLOPs per neuron; "
                                                 "with --router-sparsity counted, not yet executed: BENCHMARKS.md)."),
    router_sparsity: float = typer.Option(0.0, help="sketch router: share of each neuron's gate and up weights the "
                                                    "sketch leaves out (smallest |w| x calibration ||x||), so it reads "
                                                    "more channels for the same FLOPs. 0.6 at 25% active, 0.33 at "
                                                    "50% were best on SmolLM2."),
    router_approx: Optional[float] = typer.Option(None, help="sketch router: share of the routed FLOP budget given to "
                                                             "sketched experts, the ones ranked next, which add their "
                                                             "sketched activations through their down rows alone, in "
                                                             "[0, 1) (default: 0.3 with a fixed top-k, 0 with --tau)."),
    router_threshold: Optional[bool] = typer.Option(None, "--router-threshold/--router-top-k",
                                                    help="sketch router: each layer keeps the experts whose score "
                                                         "reaches a threshold fitted on the calibration text (the "
                                                         "same mean count as the top-k, more for some tokens, fewer "
                                                         "for others), or the same top-k for every token (default: "
                                                         "thresholds with a fixed top-k, top-k with --tau)."),
    router_input: str = typer.Option("own", help="What each mlp router reads: own (its layer's FFN input) or previous "
                                                 "(the previous layer's: Pre-gated MoE, experts known a layer ahead)."),
    budget: str = typer.Option("uniform", help="Per-layer top-k: uniform (same share everywhere) or sensitivity "
                                                "(the total split by each layer's measured error curve)."),
    shared: float = typer.Option(0.1, help="Share of expert slots given to always-on shared neurons (CMoE)."),
    refit_down: Optional[float] = typer.Option(None, help="Refit each layer's down rows after the routers (ridge "
                                                          "regression on the calibration text, layer by layer on "
                                                          "the sparse model's inputs) with this ridge strength, "
                                                          "e.g. 1.0: training-free, helps at low active shares."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    seed: int = typer.Option(0),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate dense vs MoE after converting."),
    eval_data: str = typer.Option("wiki-sample:heldout", help="Held-out text for --eval."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens for --eval."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the evaluation as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    layerwise: bool = typer.Option(False, "--layerwise/--all-at-once",
                                   help="Calibrate and build one decoder block at a time (big models; resumable)."),
    propagate: str = typer.Option("dense", help="--layerwise: what the next block sees: dense (the original "
                                                "block's outputs) or moe (the outputs of the block with its MoE FFN)."),
    device: str = typer.Option("cpu", help="--layerwise: where blocks run: cpu or cuda."),
    dtype: str = typer.Option("fp32", help="--layerwise: fp32, bf16 or fp16 (blocks run and are saved in it)."),
    offload: bool = typer.Option(False, help="--layerwise: keep hidden states between blocks on disk, not in RAM."),
    resume: bool = typer.Option(False, help="--layerwise: continue an interrupted conversion from <out>.partial/."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Convert a dense model into an MoE model and save it (then evaluate it, by default)."""
    _logging(verbose)

    def body():
        from . import convert as convert_fn, distributed, load, models, save
        from . import data as data_mod
        from . import layerwise as lw_mod
        from .config import DataConfig, MoEConfig
        from .io import check_target

        check_target(out, overwrite)
        if json_out is not None:
            check_target(json_out, overwrite)
        moe_cfg = MoEConfig(num_experts=experts, active=None if tau is not None else active, tau=tau,
                            method=method, router=router, router_loss=router_loss, router_input=router_input,
                            router_channels=router_channels, router_reuse=router_reuse, router_approx=router_approx,
                            router_threshold=router_threshold, router_sparsity=router_sparsity, shared=shared, seed=seed,
                            budget=budget, refit_down=refit_down)
        data_cfg = DataConfig(source=calib, seq_len=seq_len, tokens=calib_tokens)
        lw_cfg = lw_mod.LayerwiseConfig(propagate=propagate, device=device, dtype=dtype, offload=offload)
        moe_cfg.validate()
        data_cfg.validate()
        lw_cfg.validate()
        if not layerwise and (lw_cfg != lw_mod.LayerwiseConfig() or resume):
            raise ConfigError("--propagate, --device, --dtype, --offload and --resume need --layerwise")
        if layerwise:  # the output is written block by block; evaluation reads it back
            lw_mod.convert_to_folder(model, moe_cfg, data_cfg, lw_cfg, out, overwrite=overwrite, resume=resume,
                                     progress=True)
            typer.echo(f"saved {out}")
            if evaluate:
                m = load(out)
                _report(m, data_mod.blocks(eval_data, m.tokenizer, seq_len, max_tokens=eval_tokens), eval_data,
                        json_out, run=_run_info(m.record, "convert"))
            return
        loaded = models.load(model)
        heldout = data_mod.blocks(eval_data, loaded.tokenizer, seq_len, max_tokens=eval_tokens) if evaluate else None
        with distributed.session():  # under torchrun: data-parallel calibration, rank 0 writes
            m = convert_fn(loaded, moe=moe_cfg, data=data_cfg, progress=distributed.is_main())
            if not distributed.is_main():
                return
        save(m, out, overwrite=overwrite)
        typer.echo(f"saved {out}")
        if evaluate:
            _report(m, heldout, eval_data, json_out, run=_run_info(m.record, "convert"))

    _run(body)


@app.command("eval")
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
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing --json file."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Held-out perplexity and FFN FLOPs of the dense and the MoE model, side by side."""
    _logging(verbose)

    def body():
        from . import data as data_mod

        m = _open_run(run, json_out, overwrite, active=active, top_k=top_k, tau=tau, router_channels=router_channels,
                      router_approx=router_approx, router_reuse=router_reuse,
                      router_threshold=router_threshold)
        info = _run_info(m.record, "eval", run, {"data": data, "tokens": tokens, "seq_len": seq_len, "active": active,
                                                "top_k": top_k, "tau": tau, "router_channels": router_channels,
                                                "router_approx": router_approx, "router_reuse": router_reuse,
                                                "router_threshold": router_threshold, "oracle": oracle})
        if m.record.get("kind") == "sparse_expansion":  # a `moefy prune` folder: no dense copy inside
            return _report_pruned(m, data_mod.blocks(data, m.tokenizer, seq_len, max_tokens=tokens), data, json_out,
                                  run=info)
        _report(m, data_mod.blocks(data, m.tokenizer, seq_len, max_tokens=tokens), data, json_out, oracle, run=info)

    _run(body)


@app.command()
def tune(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    out: Path = typer.Option(..., help="Output folder for the tuned model."),
    data: str = typer.Option("wiki-sample:calib", help="Training text (as --calib)."),
    minutes: Optional[float] = typer.Option(30.0, help="Wall-clock budget in minutes (with --tokens: whichever ends first)."),
    tokens: Optional[int] = typer.Option(None, help="Token budget."),
    lr: float = typer.Option(3e-4, help="Peak AdamW learning rate (cosine decay over the budget)."),
    train: str = typer.Option("ffn", help="What learns: ffn (experts and shared neurons) or all (also attention, norms)."),
    routers: Optional[bool] = typer.Option(None, "--routers/--no-routers", help="Also refit the MLP routers online to the "
                                           "tuned experts' output norms on the tuned model's own inputs (default: on "
                                           "when every router is a trained mlp)."),
    router_lr: float = typer.Option(1e-3, help="Peak learning rate of the routers with --routers."),
    other_lr: Optional[float] = typer.Option(None, help="Peak learning rate of attention and norms with --train all "
                                             "(default: --lr)."),
    batch_size: int = typer.Option(4, help="Blocks per step."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    active: Optional[float] = typer.Option(None, help="Tune at this FFN compute share (default: the saved top-k)."),
    router_channels: Optional[float] = ROUTER_CHANNELS,
    router_approx: Optional[float] = ROUTER_APPROX,
    router_reuse: Optional[bool] = ROUTER_REUSE,
    router_threshold: Optional[bool] = ROUTER_THRESHOLD,
    tau: Optional[float] = typer.Option(None, help="Tune with dynamic-k at this threshold."),
    checkpoint_minutes: float = typer.Option(5.0, help="Minutes between checkpoints (in OUT.tuning/)."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in OUT.tuning/."),
    seed: int = typer.Option(0, help="Seeds the data order."),
    precision: str = typer.Option("auto", help="fp32, bf16 (autocast: matrix products in bf16, weights and updates "
                                  "in fp32) or auto: bf16 where the CPU (AVX512-BF16, AMX) or GPU runs it natively."),
    hidden_loss: float = typer.Option(0.0, help="Weight of a second loss term: every layer's output matched to the "
                                      "dense model's, token by token (relative squared error; 0: the KL alone)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate against the source dense model after tuning."),
    eval_data: str = typer.Option("wiki-sample:heldout", help="Held-out text for --eval."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens for --eval."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the evaluation as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Recovery tuning: distil the MoE model toward the dense model within a time or token budget."""
    _logging(verbose)

    def body():
        import shutil

        from . import data as data_mod, save
        from .io import check_target
        from .tuning import TuneConfig, tune as tune_fn

        if out.resolve() == run.resolve():
            raise ConfigError("--out must differ from the input folder (the input is never modified)")
        cfg = TuneConfig(data=data, seq_len=seq_len, batch_size=batch_size, minutes=minutes, tokens=tokens, lr=lr,
                         train=train, other_lr=other_lr, routers=routers, router_lr=router_lr,
                         checkpoint_minutes=checkpoint_minutes, seed=seed, precision=precision,
                         hidden_loss=hidden_loss)
        cfg.validate()
        check_target(out, overwrite)
        m = _open_run(run, json_out, overwrite, active=active, tau=tau, router_channels=router_channels,
                      router_approx=router_approx, router_reuse=router_reuse,
                      router_threshold=router_threshold)
        heldout = data_mod.blocks(eval_data, m.tokenizer, seq_len, max_tokens=eval_tokens) if evaluate else None
        checkpoint = out.parent / f"{out.name}.tuning"
        record = tune_fn(m, cfg, checkpoint=checkpoint, resume=resume, progress=True)
        save(m, out, overwrite=overwrite, command="tune")
        shutil.rmtree(checkpoint, ignore_errors=True)
        typer.echo(f"saved {out} ({record['steps']} steps, {record['tokens_seen']} tokens, {record['seconds']:.0f} s; "
                   f"KL {record['kl_first_10_steps']:.4f} -> {record['kl_last_10_steps']:.4f})")
        if evaluate:
            _report(m, heldout, eval_data, json_out, run=_run_info(m.record, "tune", out, {"data": eval_data,
                    "tokens": eval_tokens, "seq_len": seq_len}))

    _run(body)


@app.command()
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
    prefill_tokens: int = typer.Option(2048, help="Tokens per FFN prefill call (8 x 256)."),
    prefill_layers: int = typer.Option(4, help="FFN layers in the prefill stack."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN share."),
    router_channels: Optional[float] = ROUTER_CHANNELS,
    router_approx: Optional[float] = ROUTER_APPROX,
    router_reuse: Optional[bool] = ROUTER_REUSE,
    router_threshold: Optional[bool] = ROUTER_THRESHOLD,
    overwrite: bool = typer.Option(False, help="Replace an existing --output-json file."),
):
    """Dense vs MoE wall-clock: FFN stacks (batch 1, prefill), greedy decode tokens/s, prefill, memory."""
    _logging(False)

    def body():
        import json

        from . import bench as bench_mod
        from . import data as data_mod
        from .io import write_json

        m = _open_run(run, output_json, overwrite, active=active, router_channels=router_channels,
                      router_approx=router_approx, router_reuse=router_reuse,
                      router_threshold=router_threshold)
        seq = max(input_len, prefill_tokens // 8)
        blocks = data_mod.blocks(data, m.tokenizer, seq, max_tokens=8 * seq, min_tokens=8 * seq)
        result = bench_mod.run(m, blocks, input_len=input_len, output_len=output_len, batch_size=batch_size,
                               warmup=num_iters_warmup, iters=num_iters, rounds=rounds, threads=threads,
                               prefill_tokens=prefill_tokens, prefill_layers=prefill_layers)
        typer.echo(json.dumps(result, indent=1))
        if output_json is not None:
            write_json(output_json, result, run=_run_info(m.record, "bench", run, {
                "data": data, "input_len": input_len, "output_len": output_len, "batch_size": batch_size,
                "threads": threads, "prefill_tokens": prefill_tokens, "prefill_layers": prefill_layers,
                "active": active}))

    _run(body)


@app.command("lm-eval-task")
def lm_eval_task_cmd(
    data: str = typer.Argument("wiki-sample:heldout", help="Text: wiki-sample, pydoc (with :heldout ...), .txt or .jsonl."),
    out: Path = typer.Option(..., help="Folder for NAME.yaml and NAME.jsonl (lm_eval --include_path)."),
    name: Optional[str] = typer.Option(None, help="Task name (default: moefy_ + the data spec)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
):
    """Write a local lm-evaluation-harness perplexity task over moefy text (no hub needed)."""
    def body():
        from .lm_eval_task import write_task

        folder, task = write_task(data, out, name, overwrite)
        typer.echo(f"wrote {folder}; score a saved folder with:\n  lm_eval --model hf --model_args "
                   f"pretrained=FOLDER,trust_remote_code=True --include_path {folder} --tasks {task}")

    _run(body)


@app.command()
def sweep(
    out: Path = typer.Option(..., help="Output folder: sweep.json, sweep.png and sweep.md."),
    model: str = typer.Option("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    variant: list[str] = typer.Option(["coactivation:mlp:0.1:384", "coactivation:mlp:0:96",
                                       "coactivation:similarity:0.1:96"],
                                      help="method:router:shared:experts; repeat the flag for several."),
    active: list[float] = typer.Option([0.125, 0.25, 0.375, 0.5, 0.75], help="FFN compute shares; repeat the flag."),
    oracle: bool = typer.Option(False, help="Also score every point with perfect routing (costs a dense FFN per layer)."),
    calib: str = typer.Option("wiki-sample", help="Calibration text."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    eval_data: str = typer.Option("wiki-sample:heldout", help="Held-out text."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    router_loss: str = typer.Option("log-norm", help="mlp router target: log-norm, norm or bce."),
    budget: str = typer.Option("uniform", help="Per-layer top-k: uniform or sensitivity (see convert --help)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """Quality vs FFN compute for several variants on one model: JSON, a PNG plot and a table."""
    _logging(verbose)

    def body():
        import shutil
        import tempfile

        import json

        from . import data as data_mod
        from . import io, models
        from . import sweep as sweep_mod
        from .config import DataConfig, MoEConfig
        from .convert import calibration_record
        from .provenance import RUN_FILE, run_info, weights_hash

        io.check_target(out, overwrite)
        variants = [sweep_mod.Variant.parse(v) for v in variant]
        base = MoEConfig(router_loss=router_loss, seed=seed, budget=budget)
        data_cfg = DataConfig(source=calib, seq_len=seq_len, tokens=calib_tokens)
        data_cfg.validate()
        loaded = models.load(model)
        heldout = data_mod.blocks(eval_data, loaded.tokenizer, seq_len, max_tokens=eval_tokens)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            def progress(rows):
                r = rows[-1]
                if "skipped" in r:
                    typer.echo(f"{r['variant']} @ {r['active_target']:g}: skipped: {r['skipped']}", err=True)
                    return
                typer.echo(f"{r['variant']} @ {r['active_target']:g}: {sweep_mod.quality(r):.3f} "
                           f"({r['moe']['active_ffn_share']:.1%} active)", err=True)

            rows = sweep_mod.sweep(loaded, variants, active, heldout, base, data_cfg, oracle=oracle, on_row=progress)
            io.write_json(tmp / "sweep.json", {"model": str(loaded.source), "eval_data": eval_data, "calib": calib,
                                               "calib_tokens": calib_tokens, "router_loss": router_loss, "seed": seed,
                                               "budget": budget,
                                               "versions": io.versions(), "rows": rows})
            calib_ids = data_mod.blocks(calib, loaded.tokenizer, seq_len, max_tokens=calib_tokens)
            (tmp / RUN_FILE).write_text(json.dumps(run_info({
                "source": str(loaded.source), "source_weights": weights_hash(loaded.source, loaded.model),
                "calibration": calibration_record(data_cfg, calib_ids),
                "moe": base.to_dict(), "settings": {"variants": variant, "active": active, "oracle": oracle,
                                                    "eval_data": eval_data, "eval_tokens": eval_tokens}}, "sweep"),
                indent=1))
            sweep_mod.plot(rows, tmp / "sweep.png", title=f"{Path(str(loaded.source)).name}, {eval_data}")
            table = sweep_mod.markdown(rows)
            (tmp / "sweep.md").write_text(table + "\n")
            io.replace_path(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        typer.echo(table)
        typer.echo(f"saved {out}/sweep.json, sweep.png, sweep.md, {RUN_FILE}")

    _run(body)


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    method: str = typer.Option("sparsegpt", help="sparsegpt, wanda or magnitude."),
    sparsity: Optional[float] = typer.Option(None, help="Share of FFN weights set to zero, in [0, 1) (default 0.5)."),
    nm: Optional[str] = typer.Option(None, "--nm", help="N:M structured sparsity, e.g. 2:4 (keep N of every M)."),
    experts: int = typer.Option(1, help="Sparse Expansion: pruned copies per FFN, routed by nearest centroid."),
    pca_dim: int = typer.Option(16, help="Sparse Expansion: PCA dimensions the FFN inputs are clustered in."),
    calib: str = typer.Option("wiki-sample:calib", help="Calibration text."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/smol-pruned"), help="Output folder."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Dense vs pruned perplexity on held-out text."),
    eval_data: str = typer.Option("wiki-sample:heldout", help="Held-out text for --eval."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens for --eval."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the evaluation as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """One-shot pruning of every FFN (SparseGPT, Wanda, magnitude), or Sparse Expansion with --experts > 1."""
    _logging(verbose)

    def body():
        from . import data as data_mod
        from . import models, save
        from .config import DataConfig
        from .io import check_target
        from .pruning import PruneConfig, parse_nm
        from .sparse_expansion import ExpansionConfig, sparsify

        check_target(out, overwrite)
        if json_out is not None:
            check_target(json_out, overwrite)
        pattern = parse_nm(nm)
        if pattern and sparsity is not None and abs(sparsity - (1 - pattern[0] / pattern[1])) > 1e-9:
            raise ConfigError(f"--nm {nm} fixes the sparsity at {1 - pattern[0] / pattern[1]:g}; drop --sparsity")
        cfg = PruneConfig(method=method, sparsity=1 - pattern[0] / pattern[1] if pattern else
                          (0.5 if sparsity is None else sparsity), nm=pattern)
        expansion = ExpansionConfig(num_experts=experts, pca_dim=pca_dim, seed=seed)
        data_cfg = DataConfig(source=calib, seq_len=seq_len, tokens=calib_tokens)
        cfg.validate()
        expansion.validate(cfg)
        data_cfg.validate()
        loaded = models.load(model)
        heldout = data_mod.blocks(eval_data, loaded.tokenizer, seq_len, max_tokens=eval_tokens) if evaluate else None
        dense = _perplexity_if_causal(loaded.model, heldout) if evaluate else None
        m = sparsify(loaded.model, loaded.tokenizer, cfg, expansion, data_cfg, source=loaded.source, progress=True)
        save(m, out, overwrite=overwrite, command="prune")
        typer.echo(f"saved {out}")
        if evaluate:
            _report_pruned(m, heldout, eval_data, json_out, dense, run=_run_info(m.record, "prune"))

    _run(body)


def _perplexity_if_causal(model, blocks):
    from .arch import family_for
    from .evaluate import perplexity

    return perplexity(model, blocks, progress=True, desc="dense")[0] if family_for(model.config).causal else None


def _report_pruned(m, blocks, data, json_out, dense_ppl=None, run=None):
    """Perplexity of a pruned / sparse-expanded model (and of its dense source when given)."""
    from .io import write_json
    from .sparse_expansion import ffn_flops, set_execution

    set_execution(m.model, "dense")  # same numbers as CSR up to summation order; faster here
    result = {"data": data, "tokens": int(blocks.numel()), "prune": m.record.get("prune"),
              "experts": m.record.get("expansion", {}).get("num_experts"), **ffn_flops(m.model)}
    rows = [("", "dense", "pruned")]
    if m.family.causal:
        result["ppl"] = _perplexity_if_causal(m.model, blocks)
        result["dense_ppl"] = dense_ppl
        rows.append(("perplexity", "-" if dense_ppl is None else f"{dense_ppl:.3f}", f"{result['ppl']:.3f}"))
    rows += [("FFN MFLOPs/token", f"{result['dense_ffn_flops_per_token'] / 1e6:.1f}",
              f"{result['ffn_flops_per_token'] / 1e6:.1f}"),
             ("active FFN share", "100.0%", f"{result['active_ffn_share']:.1%}")]
    set_execution(m.model, "sparse")
    typer.echo(f"{data}: {result['tokens']} tokens")
    typer.echo("\n".join(f"{a:<18}{b:>10}  {c:>10}" for a, b, c in rows))
    if json_out is not None:
        write_json(json_out, result, run=run)


analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of a dense model's neurons or a converted model's routing.")
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("wasserstein")
def wasserstein_cmd(
    model: str = typer.Argument("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    calib: str = typer.Option("wiki-sample:calib", help="Text the neuron outputs are measured on."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    json_out: Path = typer.Option(Path("runs/wasserstein.json"), "--json", help="Per-layer distances (JSON)."),
    plot_out: Path = typer.Option(Path("runs/wasserstein.png"), "--plot", help="Per-layer box plots (PNG)."),
    experiment: bool = typer.Option(True, "--experiment/--no-experiment",
                                    help="Sparsify top-W vs bottom-W vs random neurons, held-out perplexity."),
    share: float = typer.Option(0.1, help="Experiment: share of each layer's neurons sparsified."),
    sparsity: float = typer.Option(0.9, help="Experiment: sparsity of the chosen neurons' input rows (SparseGPT)."),
    eval_data: str = typer.Option("wiki-sample:heldout", help="Experiment: held-out text."),
    eval_tokens: int = typer.Option(8192, help="Experiment: held-out tokens."),
    overwrite: bool = typer.Option(False, help="Replace existing --json / --plot files."),
):
    """Wasserstein neurons: W1 distance of every FFN neuron's output distribution to a Gaussian."""
    _logging(False)

    def body():
        from . import data as data_mod
        from . import models
        from .analysis import wasserstein
        from .config import DataConfig
        from .convert import calibration_record
        from .io import check_target, write_json
        from .provenance import run_info, weights_hash

        check_target(json_out, overwrite)
        check_target(plot_out, overwrite)
        loaded = models.load(model)
        heldout = data_mod.blocks(eval_data, loaded.tokenizer, seq_len, max_tokens=eval_tokens) if experiment else None
        calib_cfg = DataConfig(source=calib, seq_len=seq_len, tokens=calib_tokens)
        info = {"source": loaded.source, "source_weights": weights_hash(loaded.source, loaded.model),
                "calibration": calibration_record(calib_cfg, data_mod.blocks(calib, loaded.tokenizer, seq_len,
                                                                             max_tokens=calib_tokens)),
                "settings": {"experiment": experiment, "share": share, "sparsity": sparsity, "eval_data": eval_data,
                             "eval_tokens": eval_tokens}}
        result, distances = wasserstein.analyse(loaded.model, loaded.tokenizer, calib_cfg, heldout, share=share,
                                                sparsity=sparsity)
        result["source"] = loaded.source
        _write_plot(wasserstein.plot, distances, plot_out, f"Wasserstein neurons: {Path(loaded.source).name}")
        write_json(json_out, result, overwrite=overwrite, run=run_info(info, "analyze wasserstein"))
        for row in result["layers"]:
            typer.echo(f"layer {row['layer']:>2}: W1 mean {row['mean']:.3f}  p90 {row['p90']:.3f}  max {row['max']:.3f}")
        if "experiment" in result:
            e = result["experiment"]
            typer.echo(f"PPL dense {e['dense_ppl']:.3f}; {e['share']:.0%} of neurons at {e['sparsity']:.0%}: "
                       f"top-W {e['top_ppl']:.3f}, bottom-W {e['bottom_ppl']:.3f}, random {e['random_ppl']:.3f}")
        typer.echo(f"wrote {json_out} and {plot_out}")

    _run(body)


def _write_plot(plot, data, path: Path, title: str):
    """The PNG through a temporary file and one rename, like every other output."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.png"
    try:
        plot(data, tmp, title=title)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@analyze_app.command("consistency")
def consistency_cmd(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    data: str = typer.Option("wiki-sample:heldout", help="Text the routing is recorded on."),
    tokens: int = typer.Option(8192, help="Tokens (whole blocks)."),
    seq_len: int = typer.Option(512, help="Tokens per block; segments never cross blocks, so >= the longest --m."),
    m: list[int] = typer.Option([4, 16, 64, 256], "--m", help="Segment lengths in tokens; repeat the flag."),
    rho: list[float] = typer.Option([1.0, 2.0, 4.0], "--rho", help="Cache sizes as multiples of k; repeat the flag."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN compute share."),
    top_k: Optional[int] = typer.Option(None, help="Override the saved fixed top-k."),
    tau: Optional[float] = typer.Option(None, help="Override with dynamic-k at this threshold."),
    json_out: Path = typer.Option(Path("runs/consistency.json"), "--json", help="Per-layer SRP and SCH (JSON)."),
    plot_out: Path = typer.Option(Path("runs/consistency.png"), "--plot", help="The plot (PNG)."),
    overwrite: bool = typer.Option(False, help="Replace existing --json / --plot files."),
):
    """Local routing consistency (moe-lrc): SRP and SCH per layer and segment length."""
    _logging(False)

    def body():
        from . import data as data_mod
        from .analysis import consistency, routes
        from .io import check_target, write_json

        check_target(json_out, overwrite)
        check_target(plot_out, overwrite)
        consistency.check(seq_len, m, rho)
        model = _open_run(run, json_out, overwrite, active=active, top_k=top_k, tau=tau)
        blocks = data_mod.blocks(data, model.tokenizer, seq_len, max_tokens=tokens)
        result = {"run": str(run), "data": data, **consistency.analyse(routes.routing_masks(model, blocks), m, rho)}
        _write_plot(consistency.plot, result, plot_out, f"Routing consistency: {run.name}, {data}")
        write_json(json_out, result, overwrite=overwrite, run=_run_info(model.record, "analyze consistency", run, {
            "data": data, "tokens": tokens, "seq_len": seq_len, "m": m, "rho": rho, "active": active,
            "top_k": top_k, "tau": tau}))
        typer.echo(consistency.markdown(result))
        typer.echo(f"wrote {json_out} and {plot_out}")

    _run(body)


@analyze_app.command("specialisation")
def specialisation_cmd(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    data: list[str] = typer.Option(["wiki-sample:heldout", "pydoc:heldout"], help="Two text domains; give the flag twice."),
    tokens: int = typer.Option(8192, help="Tokens per domain (the larger domain is cut to the smaller's blocks)."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    active: Optional[float] = typer.Option(None, help="Override: fixed top-k per layer for this FFN compute share."),
    top_k: Optional[int] = typer.Option(None, help="Override the saved fixed top-k."),
    tau: Optional[float] = typer.Option(None, help="Override with dynamic-k at this threshold."),
    json_out: Path = typer.Option(Path("runs/specialisation.json"), "--json", help="Per-layer usage and overlap (JSON)."),
    plot_out: Path = typer.Option(Path("runs/specialisation.png"), "--plot", help="The plot (PNG)."),
    overwrite: bool = typer.Option(False, help="Replace existing --json / --plot files."),
):
    """Which experts two text domains use per layer, their overlap, and how it changes with depth."""
    _logging(False)

    def body():
        from . import data as data_mod
        from .analysis import routes, specialisation
        from .io import check_target, write_json

        if len(data) != 2 or data[0] == data[1]:
            raise ConfigError(f"give exactly two different --data texts, got {data}")
        check_target(json_out, overwrite)
        check_target(plot_out, overwrite)
        model = _open_run(run, json_out, overwrite, active=active, top_k=top_k, tau=tau)
        texts = {d: data_mod.blocks(d, model.tokenizer, seq_len, max_tokens=tokens) for d in data}
        result = {"run": str(run), **specialisation.analyse({d: routes.routing_masks(model, t) for d, t in texts.items()})}
        _write_plot(specialisation.plot, result, plot_out, f"Specialisation: {run.name}")
        write_json(json_out, result, overwrite=overwrite, run=_run_info(model.record, "analyze specialisation", run, {
            "data": data, "tokens": tokens, "seq_len": seq_len, "active": active, "top_k": top_k, "tau": tau}))
        typer.echo(specialisation.markdown(result))
        typer.echo(f"wrote {json_out} and {plot_out}")

    _run(body)


@app.command()
def report(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: RUN-report beside RUN)."),
    data: list[str] = typer.Option(["wiki-sample:heldout", "pydoc:heldout"],
                                   help="Texts: the first for quality and consistency, the first two for specialisation."),
    tokens: int = typer.Option(8192, help="Tokens per text for the routing analyses."),
    seq_len: int = typer.Option(512, help="Tokens per block for the routing analyses."),
    active: list[float] = typer.Option([0.25, 0.5, 0.75], help="FFN compute shares of the quality points; repeat the flag."),
    m: list[int] = typer.Option([4, 16, 64, 256], "--m", help="Consistency: segment lengths in tokens; repeat the flag."),
    rho: list[float] = typer.Option([1.0, 2.0, 4.0], "--rho", help="Consistency: cache sizes as multiples of k."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens per quality point."),
    sweep_json: Optional[Path] = typer.Option(None, "--sweep", help="A `moefy sweep` sweep.json: its curves instead."),
    bench_json: Optional[Path] = typer.Option(None, "--bench", help="A `moefy bench --output-json` file."),
    wasserstein_json: Optional[Path] = typer.Option(None, "--wasserstein", help="A `moefy analyze wasserstein` JSON."),
    consistency_json: Optional[Path] = typer.Option(None, "--consistency", help="A `moefy analyze consistency` JSON."),
    specialisation_json: Optional[Path] = typer.Option(None, "--specialisation",
                                                       help="A `moefy analyze specialisation` JSON."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
):
    """One page on a converted model: report.md with its PNGs, and a self-contained report.html."""
    _logging(verbose)

    def body():
        from . import load
        from . import report as report_mod
        from .io import check_target

        target = out if out is not None else run.parent / f"{run.name}-report"
        check_target(target, overwrite)
        files = {"sweep": sweep_json, "bench": bench_json, "wasserstein": wasserstein_json,
                 "consistency": consistency_json, "specialisation": specialisation_json}
        loaded = {k: report_mod.read_json(p, k) for k, p in files.items() if p is not None}
        inputs = report_mod.Inputs(data=list(data), tokens=tokens, seq_len=seq_len, eval_tokens=eval_tokens,
                                   actives=list(active), segments=list(m), ratios=list(rho), **loaded)
        report_mod.check(inputs)
        report_mod.build(load(run), run.name, inputs, target, overwrite=overwrite)
        typer.echo(f"wrote {target}/report.md, report.html")

    _run(body)


def _open_run(run, json_out, overwrite, active=None, top_k=None, tau=None, router_channels=None, router_approx=None,
              router_reuse=None, router_threshold=None):
    """Check the JSON target first (nothing is overwritten by surprise), load, apply overrides."""
    from . import load
    from .io import check_target

    if json_out is not None:
        check_target(json_out, overwrite)
    m = load(run)
    if router_channels is not None:
        m.set_router_channels(router_channels)
    if router_approx is not None:
        m.set_router_approx(router_approx)
    if router_reuse is not None:
        m.set_router_reuse(router_reuse)
    if router_threshold is not None:
        m.set_router_threshold(router_threshold)
    if active is not None:
        m.set_active(active)
    if top_k is not None or tau is not None:
        m.set_routing(top_k=top_k, tau=tau)
    return m


def _report(m, blocks, data, json_out, oracle=False, run=None):
    from .evaluate import evaluate
    from .io import write_json

    result = {**evaluate(m, blocks, progress=True, oracle=oracle), "data": data}
    typer.echo(render(result))
    if json_out is not None:
        write_json(json_out, result, run=run)


def _run_info(record: dict, command: str, folder: Path | None = None, settings: dict | None = None) -> dict:
    """moefy_run.json content for a JSON output: the model's own record, or (eval, bench) the
    model folder as the source, with the command's settings."""
    from .provenance import run_info, weights_hash

    if folder is not None:
        record = {**record, "source": str(folder), "source_weights": weights_hash(folder),
                  "settings": settings or {}}
    return run_info(record, command)


def render(r: dict) -> str:
    d, m = r["dense"], r["moe"]
    rows = [("", "dense", "moe")]
    if "ppl" in d:
        rows.append(("perplexity", f"{d['ppl']:.3f}", f"{m['ppl']:.3f} ({r['ppl_ratio']:.2f}x)"))
    else:
        rows.append(("cosine to dense", "1.000", f"{m['cosine_to_dense']:.4f}"))
    rows += [("FFN MFLOPs/token", f"{d['ffn_flops_per_token'] / 1e6:.1f}", f"{m['ffn_flops_per_token'] / 1e6:.1f}"),
             ("active FFN share", "100.0%", f"{m['active_ffn_share']:.1%}"),
             ("active neurons", "100.0%", f"{m['active_neuron_share']:.1%}")]
    if "oracle" in r:
        o = r["oracle"]
        rows += [("oracle routing PPL", "", f"{o['ppl']:.3f} ({o['ppl_ratio']:.2f}x)"),
                 ("router recall", "", f"{o['router_recall']:.1%}")]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    return "\n".join([f"{r.get('data', '')}: {r['tokens']} tokens", *lines])


def _logging(verbose: bool):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


from . import cli_inference  # noqa: E402,F401  (registers analyze pregate / offload / core)

if __name__ == "__main__":
    app()
