"""What every command shares: the error guard (one line, exit code 2), opening a saved run with its
overrides, rendering and writing an evaluation."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from moefy.errors import MoefyError

def run_command(fn):
    """Run a command body: user errors become one line on stderr and exit code 2."""
    try:
        return fn()
    except MoefyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; the output was not written (a --layerwise convert continues with --resume)", err=True)
        raise typer.Exit(130)


# Options many commands share (one declaration, one help text).
VERBOSE = typer.Option(False, "-v", "--verbose", help="Log each stage's progress.")
OVERWRITE_OUT = typer.Option(False, help="Replace an existing output folder.")
RESULT_JSON = typer.Option(None, "--json", help="Write the result as JSON here.")
OVERWRITE_FILES = typer.Option(False, help="Replace existing --json / --plot files.")
OVERWRITE_JSON = typer.Option(False, help="Replace an existing --json file.")
EVAL_JSON = typer.Option(None, "--json", help="Write the evaluation as JSON here.")
EVAL_TOKENS = typer.Option(8192, help="Held-out tokens for --eval.")
EVAL_DATA = typer.Option("wiki-sample:heldout", help="Held-out text for --eval.")
THREADS = typer.Option(1, help="torch threads.")

ROUTER_CHANNELS = typer.Option(None, help="Override a sketch router's share of input channels (applied before --active).")


ROUTER_APPROX = typer.Option(None, help="Override a sketch router's approx share (sketched experts; applied before "
                                        "--active).")


ROUTER_REUSE = typer.Option(None, "--router-reuse/--no-router-reuse",
                            help="Override whether a sketch router's selected neurons start from its sums (their "
                                 "FLOPs, so the top-k a share allows, change; applied before --active).")


DENSE_PROMPT_FROM = typer.Option(None, help="Calls of at least this many tokens (a prompt) take the dense FFN, "
                                               "where it is faster; 0: never (default: the model's own setting).")
ROUTER_THRESHOLD = typer.Option(None, "--router-threshold/--router-top-k",
                                help="Override how a sketch router selects: by its score thresholds (a model "
                                     "converted with them) or a fixed top-k.")


def open_run(run, json_out, overwrite, active=None, top_k=None, tau=None, router_channels=None, router_approx=None,
              router_reuse=None, router_threshold=None, dense_prompt_from=None):
    """Check the JSON target first (nothing is overwritten by surprise), load, apply overrides."""
    from moefy import load
    from moefy.io import check_target

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
    if dense_prompt_from is not None:  # 0: never
        m.set_dense_prompt_from(dense_prompt_from or None)
    return m


def report_eval(m, blocks, data, json_out, oracle=False, run=None):
    from moefy.eval.evaluate import evaluate
    from moefy.io import write_json

    result = {**evaluate(m, blocks, progress=True, oracle=oracle), "data": data}
    typer.echo(render(result))
    if json_out is not None:
        write_json(json_out, result, run=run)


def run_info_for(record: dict, command: str, folder: Path | None = None, settings: dict | None = None) -> dict:
    """moefy_run.json content for a JSON output: the model's own record, or (eval, bench) the
    model folder as the source, with the command's settings."""
    from moefy.provenance import run_info, weights_hash

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
    x = m.get("executed")
    if x is not None:  # what the decode path executes, router included
        rows += [("FFN MB read/token", f"{x['dense_bytes_per_token'] / 1e6:.1f}",
                  f"{x['decode_bytes_per_token'] / 1e6:.1f} ({x['executed_bytes_share']:.1%})"),
                 ("  of which router", "", f"{x['router_bytes_per_token'] / 1e6:.1f} ({x['router_bytes_share']:.1%})"),
                 ("FFN MFLOPs/token", f"{d['ffn_flops_per_token'] / 1e6:.1f}",
                  f"{x['decode_flops_per_token'] / 1e6:.1f} ({x['executed_flops_share']:.1%})")]
    rows += [("counted FLOP share (old)", "100.0%", f"{m['active_ffn_share']:.1%}"),
             ("active neurons", "100.0%", f"{m['active_neuron_share']:.1%}")]
    if "oracle" in r:
        o = r["oracle"]
        rows += [("oracle routing PPL", "", f"{o['ppl']:.3f} ({o['ppl_ratio']:.2f}x)"),
                 ("router recall", "", f"{o['router_recall']:.1%}")]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    note = [f"({r['scoring']})"] if "scoring" in r else []
    return "\n".join([f"{r.get('data', '')}: {r['tokens']} tokens", *lines, *note])


def setup_logging(verbose: bool):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def write_plot(plot, data, path: Path, title: str):
    """The PNG through a temporary file and one rename, like every other output."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.png"
    try:
        plot(data, tmp, title=title)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
