"""`moefy tune`: recovery tuning of a converted model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moefy.cli.common import (EVAL_DATA, EVAL_JSON, EVAL_TOKENS, OVERWRITE_OUT, ROUTER_APPROX, ROUTER_CHANNELS,
                              ROUTER_REUSE, ROUTER_THRESHOLD, VERBOSE, open_run, report_eval, run_command,
                              run_info_for, setup_logging)
from moefy.errors import ConfigError

TUNE_MINUTES = typer.Option(30.0, help="Wall-clock budget in minutes (with --tokens: whichever ends first).")
TUNE_TRAIN = typer.Option("ffn", help="What learns: ffn (experts and shared neurons), down (their down rows only: "
    "a third of the gradients and optimizer state, for models too big for ffn) or all (also attention, norms).")
TUNE_RECOMPUTE = typer.Option(False, help="Gradient checkpointing: recompute each decoder block in the backward "
    "pass instead of keeping its activations (less memory, slower steps).")
TUNE_ROUTERS = typer.Option(None, "--routers/--no-routers", help="Also refit the MLP routers online to the "
    "tuned experts' output norms on the tuned model's own inputs (default: on "
    "when every router is a trained mlp).")
TUNE_OTHER_LR = typer.Option(None, help="Peak learning rate of attention and norms with --train all "
    "(default: --lr).")
TUNE_PRECISION = typer.Option("auto", help="fp32, bf16 (autocast: matrix products in bf16, weights and updates "
    "in fp32) or auto: bf16 where the CPU (AVX512-BF16, AMX) or GPU runs it natively.")
TUNE_HIDDEN_LOSS = typer.Option(0.0, help="Weight of a second loss term: every layer's output matched to the "
    "dense model's, token by token (relative squared error; 0: the KL alone).")
TUNE_EVALUATE = typer.Option(True, "--eval/--no-eval", help="Evaluate against the source dense model after tuning.")


def tune(
    run: Path = typer.Argument(..., help="A folder written by `moefy convert`."),
    out: Path = typer.Option(..., help="Output folder for the tuned model."),
    data: str = typer.Option("wiki-sample:calib", help="Training text (as --calib)."),
    minutes: Optional[float] = TUNE_MINUTES,
    tokens: Optional[int] = typer.Option(None, help="Token budget."),
    lr: float = typer.Option(3e-4, help="Peak AdamW learning rate (cosine decay over the budget)."),
    train: str = TUNE_TRAIN,
    routers: Optional[bool] = TUNE_ROUTERS,
    router_lr: float = typer.Option(1e-3, help="Peak learning rate of the routers with --routers."),
    other_lr: Optional[float] = TUNE_OTHER_LR,
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
    precision: str = TUNE_PRECISION,
    hidden_loss: float = TUNE_HIDDEN_LOSS,
    recompute: bool = TUNE_RECOMPUTE,
    evaluate: bool = TUNE_EVALUATE,
    eval_data: str = EVAL_DATA,
    eval_tokens: int = EVAL_TOKENS,
    json_out: Optional[Path] = EVAL_JSON,
    overwrite: bool = OVERWRITE_OUT,
    verbose: bool = VERBOSE,
):
    """Recovery tuning: distil the MoE model toward the dense model within a time or token budget."""
    setup_logging(verbose)

    cfg = dict(data=data, seq_len=seq_len, batch_size=batch_size, minutes=minutes, tokens=tokens, lr=lr, train=train,
               other_lr=other_lr, routers=routers, router_lr=router_lr, checkpoint_minutes=checkpoint_minutes,
               seed=seed, precision=precision, hidden_loss=hidden_loss, recompute=recompute)
    overrides = dict(active=active, tau=tau, router_channels=router_channels, router_approx=router_approx,
                     router_reuse=router_reuse, router_threshold=router_threshold)
    evaluation = dict(data=eval_data, tokens=eval_tokens, json_out=json_out) if evaluate else None
    run_command(lambda: _tune(run, out, cfg, overrides, evaluation, resume, overwrite))


def _tune(run: Path, out: Path, settings: dict, overrides: dict, evaluation: dict | None, resume: bool,
          overwrite: bool):
    import shutil

    from moefy import save
    from moefy.io import check_target
    from moefy.pipeline import data as data_mod
    from moefy.tuning.distill import TuneConfig, tune as tune_fn

    if out.resolve() == run.resolve():
        raise ConfigError("--out must differ from the input folder (the input is never modified)")
    cfg = TuneConfig(**settings)
    cfg.validate()
    check_target(out, overwrite)
    json_out = None if evaluation is None else evaluation["json_out"]
    m = open_run(run, json_out, overwrite, **overrides)
    heldout = None if evaluation is None else data_mod.blocks(evaluation["data"], m.tokenizer, cfg.seq_len,
                                                              max_tokens=evaluation["tokens"])
    checkpoint = out.parent / f"{out.name}.tuning"
    record = tune_fn(m, cfg, checkpoint=checkpoint, resume=resume, progress=True)
    save(m, out, overwrite=overwrite, command="tune")
    shutil.rmtree(checkpoint, ignore_errors=True)
    typer.echo(f"saved {out} ({record['steps']} steps, {record['tokens_seen']} tokens, {record['seconds']:.0f} s; "
               f"KL {record['kl_first_10_steps']:.4f} -> {record['kl_last_10_steps']:.4f})")
    if evaluation is not None:
        report_eval(m, heldout, evaluation["data"], json_out, run=run_info_for(
            m.record, "tune", out, {"data": evaluation["data"], "tokens": evaluation["tokens"], "seq_len": cfg.seq_len}))
