"""`moefy convert`: a dense model to a saved MoE model (then evaluated, by default), by a preset
(presets.py) whose settings single flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moefy.cli.common import (EVAL_DATA, EVAL_JSON, EVAL_TOKENS, OVERWRITE_OUT, VERBOSE, report_eval, run_command,
                              run_info_for, setup_logging)
from moefy.errors import ConfigError
from moefy.presets import DEFAULT, names

ADV = "Advanced (a preset sets these)"


CONVERT_CALIB = typer.Option(None, help="Calibration text: wiki-sample, pydoc, a .txt or .jsonl file, or a mixture with equal shares (wiki-sample+pydoc).")
CONVERT_PRESET = typer.Option(None, help=f"Recipe: {DEFAULT} (the default), "
                                         f"{', '.join(n for n in names() if n != DEFAULT)}, or a .json preset file; "
                                         "`moefy presets` lists them with their results. Flags below override its "
                                         "settings.")
CONVERT_EXPERT_SIZE = typer.Option(None, help="Neurons per expert (fits any FFN width; 1 = single-neuron experts).")
CONVERT_EXPERTS = typer.Option(None, help="Expert slots per FFN instead of --expert-size (shared slots included); must divide the FFN width.", rich_help_panel=ADV)
CONVERT_ACTIVE = typer.Option(None, help="Target share of FFN compute per token, router counted, in (0, 1].")
CONVERT_METHOD = typer.Option(None, help="Grouping: random, param-kmeans, coactivation.", rich_help_panel=ADV)
CONVERT_ROUTER = typer.Option(None, help="Router: quant (a 4-bit copy of gate and up ranks the neurons), sketch "
                                         "(reads a share of the experts' own weights), mlp, similarity, "
                                         "representative.", rich_help_panel=ADV)
CONVERT_ROUTER_LOSS = typer.Option(None, help="mlp router target: log-norm, norm (D2DMoE) or bce (MoEfication).", rich_help_panel=ADV)
CONVERT_ROUTER_CHANNELS = typer.Option(None, help="sketch router: share of each token's input channels "
    "(largest |x|) it reads, in (0, 1] (default: 0.8 x "
    "the active share, following --active later).", rich_help_panel=ADV)
CONVERT_ROUTER_REUSE = typer.Option(None, "--router-reuse/--no-router-reuse", help="sketch router: the selected neurons start from the sketch's sums "
    "and add only the products it left out (fewer FLOPs per neuron; "
    "with --router-sparsity counted, not yet executed: BENCHMARKS.md).", rich_help_panel=ADV)
CONVERT_ROUTER_SPARSITY = typer.Option(None, help="sketch router: share of each neuron's gate and up weights the "
    "sketch leaves out (smallest |w| x calibration ||x||), so it reads "
    "more channels for the same FLOPs. 0.6 at 25% active, 0.33 at "
    "50% were best on SmolLM2.", rich_help_panel=ADV)
CONVERT_ROUTER_APPROX = typer.Option(None, help="sketch router: share of the routed FLOP budget given to "
    "sketched experts, the ones ranked next, which add their "
    "sketched activations through their down rows alone, in "
    "[0, 1) (default: 0.3 with a fixed top-k, 0 with --tau).", rich_help_panel=ADV)
CONVERT_ROUTER_THRESHOLD = typer.Option(None, "--router-threshold/--router-top-k",
    help="sketch router: each layer keeps the experts whose score "
         "reaches a threshold fitted on the calibration text (the "
         "same mean count as the top-k, more for some tokens, fewer "
         "for others), or the same top-k for every token (default: "
         "thresholds with a fixed top-k, top-k with --tau).", rich_help_panel=ADV)
CONVERT_ROUTER_INPUT = typer.Option(None, help="What each mlp router reads: own (its layer's FFN input) or previous "
    "(the previous layer's: Pre-gated MoE, experts known a layer ahead).", rich_help_panel=ADV)
CONVERT_BUDGET = typer.Option(None, help="Per-layer top-k: uniform (same share everywhere) or sensitivity "
    "(the total split by each layer's measured error curve).", rich_help_panel=ADV)
CONVERT_SHARED = typer.Option(None, help="Share of expert slots given to always-on shared neurons (CMoE).", rich_help_panel=ADV)
CONVERT_REFIT_DOWN = typer.Option(None, help="Refit each layer's down rows after the routers (ridge "
    "regression on the calibration text, layer by layer on "
    "the sparse model's inputs) with this ridge strength, "
    "e.g. 1.0: training-free, helps at low active shares.", rich_help_panel=ADV)
CONVERT_LAYERWISE = typer.Option(False, "--layerwise/--all-at-once",
    help="Calibrate and build one decoder block at a time (big models; resumable).")
CONVERT_PROPAGATE = typer.Option("dense", help="--layerwise: what the next block sees: dense (the original "
    "block's outputs) or moe (the outputs of the block with its MoE FFN).", rich_help_panel=ADV)
CONVERT_DTYPE = typer.Option("fp32", help="--layerwise: fp32, bf16 or fp16 (blocks run and are saved in it).", rich_help_panel=ADV)
CONVERT_OFFLOAD = typer.Option(False, help="--layerwise: keep hidden states between blocks on disk, not in RAM.", rich_help_panel=ADV)


def convert(
    model: str = typer.Option("smollm2-135m", help="Local HF folder, .gguf file, or smollm2-135m."),
    calib: Optional[str] = CONVERT_CALIB,
    out: Path = typer.Option(Path("runs/smol-moe"), help="Output folder."),
    preset: Optional[str] = CONVERT_PRESET,
    expert_size: Optional[int] = CONVERT_EXPERT_SIZE,
    experts: Optional[int] = CONVERT_EXPERTS,
    active: Optional[float] = CONVERT_ACTIVE,
    tau: Optional[float] = typer.Option(None, help="Dynamic-k threshold in [0, 1) instead of a fixed top-k."),
    method: Optional[str] = CONVERT_METHOD,
    router: Optional[str] = CONVERT_ROUTER,
    router_loss: Optional[str] = CONVERT_ROUTER_LOSS,
    router_channels: Optional[float] = CONVERT_ROUTER_CHANNELS,
    router_reuse: Optional[bool] = CONVERT_ROUTER_REUSE,
    router_sparsity: Optional[float] = CONVERT_ROUTER_SPARSITY,
    router_approx: Optional[float] = CONVERT_ROUTER_APPROX,
    router_threshold: Optional[bool] = CONVERT_ROUTER_THRESHOLD,
    router_input: Optional[str] = CONVERT_ROUTER_INPUT,
    budget: Optional[str] = CONVERT_BUDGET,
    shared: Optional[float] = CONVERT_SHARED,
    refit_down: Optional[float] = CONVERT_REFIT_DOWN,
    calib_tokens: Optional[int] = typer.Option(None, help="Calibration tokens."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per block.", rich_help_panel=ADV),
    seed: Optional[int] = typer.Option(None, help="Seeds grouping and router training.", rich_help_panel=ADV),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate dense vs MoE after converting."),
    eval_data: str = EVAL_DATA,
    eval_tokens: int = EVAL_TOKENS,
    json_out: Optional[Path] = EVAL_JSON,
    overwrite: bool = OVERWRITE_OUT,
    layerwise: bool = CONVERT_LAYERWISE,
    propagate: str = CONVERT_PROPAGATE,
    device: str = typer.Option("cpu", help="--layerwise: where blocks run: cpu or cuda.", rich_help_panel=ADV),
    dtype: str = CONVERT_DTYPE,
    offload: bool = CONVERT_OFFLOAD,
    resume: bool = typer.Option(False, help="--layerwise: continue an interrupted conversion from <out>.partial/."),
    verbose: bool = VERBOSE,
):
    """Convert a dense model into an MoE model and save it (then evaluate it, by default).
    With no flags but --model, the recommended preset (balanced)."""
    setup_logging(verbose)
    moe_flags = dict(num_experts=experts, expert_size=expert_size, active=active, tau=tau, method=method,
                     router=router, router_loss=router_loss, router_input=router_input, router_channels=router_channels,
                     router_reuse=router_reuse, router_approx=router_approx, router_threshold=router_threshold,
                     router_sparsity=router_sparsity, shared=shared, seed=seed, budget=budget, refit_down=refit_down)
    data_flags = dict(source=calib, seq_len=seq_len, tokens=calib_tokens)
    lw_flags = dict(propagate=propagate, device=device, dtype=dtype, offload=offload)
    evaluation = dict(data=eval_data, tokens=eval_tokens, json_out=json_out) if evaluate else None
    run_command(lambda: _convert(model, out, preset, moe_flags, data_flags, lw_flags, layerwise, resume, overwrite,
                                 evaluation))


def _convert(model, out, preset, moe_flags, data_flags, lw_flags, layerwise, resume, overwrite, evaluation):
    from moefy import convert as convert_fn, load, save
    from moefy.io import check_target
    from moefy.pipeline import distributed, load as models
    from moefy.pipeline import layerwise as lw_mod
    from moefy.presets import get as get_preset

    recipe = get_preset(preset)
    moe_cfg, data_cfg = recipe.moe_config(**moe_flags), recipe.data_config(**data_flags)
    lw_cfg = lw_mod.LayerwiseConfig(**lw_flags)
    for cfg in (moe_cfg, data_cfg, lw_cfg):
        cfg.validate()
    if not layerwise and (lw_cfg != lw_mod.LayerwiseConfig() or resume):
        raise ConfigError("--propagate, --device, --dtype, --offload and --resume need --layerwise")
    check_target(out, overwrite)
    if evaluation is not None and evaluation["json_out"] is not None:
        check_target(evaluation["json_out"], overwrite)
    models.check_fits(model, moe_cfg)  # before the weights are loaded
    if layerwise:  # the output is written block by block; evaluation reads it back
        lw_mod.convert_to_folder(model, moe_cfg, data_cfg, lw_cfg, out, overwrite=overwrite, resume=resume,
                                 progress=True)
        typer.echo(f"saved {out}")
        if evaluation is not None:
            _evaluate(load(out), evaluation, data_cfg.seq_len)
        return
    loaded = models.load(model)
    with distributed.session():  # under torchrun: data-parallel calibration, rank 0 writes
        m = convert_fn(loaded, moe=moe_cfg, data=data_cfg, progress=distributed.is_main())
        if not distributed.is_main():
            return
    save(m, out, overwrite=overwrite)
    typer.echo(f"saved {out}")
    if evaluation is not None:
        _evaluate(m, evaluation, data_cfg.seq_len)


def _evaluate(m, evaluation: dict, seq_len: int):
    from moefy.pipeline import data as data_mod

    blocks = data_mod.blocks(evaluation["data"], m.tokenizer, seq_len, max_tokens=evaluation["tokens"])
    report_eval(m, blocks, evaluation["data"], evaluation["json_out"], run=run_info_for(m.record, "convert"))
