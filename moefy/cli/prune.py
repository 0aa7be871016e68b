"""`moefy prune`: one-shot pruning of every FFN, or Sparse Expansion."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moefy.cli.common import (EVAL_DATA, EVAL_JSON, EVAL_TOKENS, OVERWRITE_OUT, VERBOSE, run_command, run_info_for,
                              setup_logging)
from moefy.errors import ConfigError

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
    eval_data: str = EVAL_DATA,
    eval_tokens: int = EVAL_TOKENS,
    json_out: Optional[Path] = EVAL_JSON,
    overwrite: bool = OVERWRITE_OUT,
    verbose: bool = VERBOSE,
):
    """One-shot pruning of every FFN (SparseGPT, Wanda, magnitude), or Sparse Expansion with --experts > 1."""
    setup_logging(verbose)

    def body():
        from moefy.pipeline import data as data_mod
        from moefy.pipeline import load as models
        from moefy import save
        from moefy.config import DataConfig
        from moefy.io import check_target
        from moefy.expansion.pruning import PruneConfig, parse_nm
        from moefy.expansion.sparse_expansion import ExpansionConfig, sparsify

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
            report_pruned(m, heldout, eval_data, json_out, dense, run=run_info_for(m.record, "prune"))

    run_command(body)


def _perplexity_if_causal(model, blocks):
    from moefy.arch import family_for
    from moefy.eval.evaluate import perplexity

    return perplexity(model, blocks, progress=True, desc="dense")[0] if family_for(model.config).causal else None


def report_pruned(m, blocks, data, json_out, dense_ppl=None, run=None):
    """Perplexity of a pruned / sparse-expanded model (and of its dense source when given)."""
    from moefy.io import write_json
    from moefy.expansion.sparse_expansion import ffn_flops, set_execution

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
