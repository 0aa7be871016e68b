"""`moefy presets`: the named recipes, their settings and what they measured."""

from __future__ import annotations

import json

import typer


def presets_cmd(
    name: str = typer.Argument(None, help="Show one preset's full settings (as JSON, a valid preset file)."),
):
    """List the presets of `moefy convert --preset` with their measured results."""
    from moefy.cli.common import run_command
    from moefy.presets import DEFAULT, PRESETS, get

    def body():
        if name is not None:
            p = get(name)
            typer.echo(json.dumps({"summary": p.summary, **p.settings(), "measured": p.measured}, indent=1))
            return
        for p in PRESETS.values():
            default = " (default)" if p.name == DEFAULT else ""
            typer.echo(f"{p.name}{default}: {p.summary}\n    measured: {p.measured}")

    run_command(body)
