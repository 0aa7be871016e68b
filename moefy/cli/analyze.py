"""`moefy analyze wasserstein | consistency | specialisation` and `moefy report`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moefy.cli.common import (OVERWRITE_FILES, OVERWRITE_OUT, VERBOSE, open_run, run_command, run_info_for,
                              setup_logging, write_plot)
from moefy.errors import ConfigError

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
    overwrite: bool = OVERWRITE_FILES,
):
    """Wasserstein neurons: W1 distance of every FFN neuron's output distribution to a Gaussian."""
    setup_logging(False)

    def body():
        from moefy.pipeline import data as data_mod
        from moefy.pipeline import load as models
        from moefy.analysis import wasserstein
        from moefy.config import DataConfig
        from moefy.pipeline.calibrate import calibration_record
        from moefy.io import check_target, write_json
        from moefy.provenance import run_info, weights_hash

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
        write_plot(wasserstein.plot, distances, plot_out, f"Wasserstein neurons: {Path(loaded.source).name}")
        write_json(json_out, result, overwrite=overwrite, run=run_info(info, "analyze wasserstein"))
        for row in result["layers"]:
            typer.echo(f"layer {row['layer']:>2}: W1 mean {row['mean']:.3f}  p90 {row['p90']:.3f}  max {row['max']:.3f}")
        if "experiment" in result:
            e = result["experiment"]
            typer.echo(f"PPL dense {e['dense_ppl']:.3f}; {e['share']:.0%} of neurons at {e['sparsity']:.0%}: "
                       f"top-W {e['top_ppl']:.3f}, bottom-W {e['bottom_ppl']:.3f}, random {e['random_ppl']:.3f}")
        typer.echo(f"wrote {json_out} and {plot_out}")

    run_command(body)


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
    overwrite: bool = OVERWRITE_FILES,
):
    """Local routing consistency (moe-lrc): SRP and SCH per layer and segment length."""
    setup_logging(False)

    def body():
        from moefy.pipeline import data as data_mod
        from moefy.analysis import consistency, routes
        from moefy.io import check_target, write_json

        check_target(json_out, overwrite)
        check_target(plot_out, overwrite)
        consistency.check(seq_len, m, rho)
        model = open_run(run, json_out, overwrite, active=active, top_k=top_k, tau=tau)
        blocks = data_mod.blocks(data, model.tokenizer, seq_len, max_tokens=tokens)
        result = {"run": str(run), "data": data, **consistency.analyse(routes.routing_masks(model, blocks), m, rho)}
        write_plot(consistency.plot, result, plot_out, f"Routing consistency: {run.name}, {data}")
        write_json(json_out, result, overwrite=overwrite, run=run_info_for(model.record, "analyze consistency", run, {
            "data": data, "tokens": tokens, "seq_len": seq_len, "m": m, "rho": rho, "active": active,
            "top_k": top_k, "tau": tau}))
        typer.echo(consistency.markdown(result))
        typer.echo(f"wrote {json_out} and {plot_out}")

    run_command(body)


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
    overwrite: bool = OVERWRITE_FILES,
):
    """Which experts two text domains use per layer, their overlap, and how it changes with depth."""
    setup_logging(False)

    def body():
        from moefy.pipeline import data as data_mod
        from moefy.analysis import routes, specialisation
        from moefy.io import check_target, write_json

        if len(data) != 2 or data[0] == data[1]:
            raise ConfigError(f"give exactly two different --data texts, got {data}")
        check_target(json_out, overwrite)
        check_target(plot_out, overwrite)
        model = open_run(run, json_out, overwrite, active=active, top_k=top_k, tau=tau)
        texts = {d: data_mod.blocks(d, model.tokenizer, seq_len, max_tokens=tokens) for d in data}
        result = {"run": str(run), **specialisation.analyse({d: routes.routing_masks(model, t) for d, t in texts.items()})}
        write_plot(specialisation.plot, result, plot_out, f"Specialisation: {run.name}")
        write_json(json_out, result, overwrite=overwrite, run=run_info_for(model.record, "analyze specialisation", run, {
            "data": data, "tokens": tokens, "seq_len": seq_len, "active": active, "top_k": top_k, "tau": tau}))
        typer.echo(specialisation.markdown(result))
        typer.echo(f"wrote {json_out} and {plot_out}")

    run_command(body)


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
    overwrite: bool = OVERWRITE_OUT,
    verbose: bool = VERBOSE,
):
    """One page on a converted model: report.md with its PNGs, and a self-contained report.html."""
    setup_logging(verbose)

    def body():
        from moefy import load
        from moefy.analysis import report as report_mod
        from moefy.io import check_target

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

    run_command(body)
