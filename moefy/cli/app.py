"""moefy's command line: one Typer app; each command lives in the module of its group and is
registered here (parse flags, build configs, call one library function, render)."""

from __future__ import annotations

import typer

from moefy.cli import analyze, convert, evaluate, inference, presets, prune, tune

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Turn a dense transformer into a sparse Mixture-of-Experts model.")
app.command()(convert.convert)
app.command("presets")(presets.presets_cmd)
app.command("eval")(evaluate.eval_cmd)
app.command()(tune.tune)
app.command()(evaluate.bench)
app.command("lm-eval-task")(evaluate.lm_eval_task_cmd)
app.command()(evaluate.sweep)
app.command("frontier")(evaluate.frontier_cmd)
app.command("prune")(prune.prune_cmd)
app.command()(analyze.report)

analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of a dense model's neurons or a converted model's routing.")
app.add_typer(analyze_app, name="analyze")
analyze_app.command("wasserstein")(analyze.wasserstein_cmd)
analyze_app.command("consistency")(analyze.consistency_cmd)
analyze_app.command("specialisation")(analyze.specialisation_cmd)
analyze_app.command("pregate")(inference.pregate_cmd)
analyze_app.command("offload")(inference.offload_cmd)
analyze_app.command("core")(inference.core_cmd)

if __name__ == "__main__":
    app()
