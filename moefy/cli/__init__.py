"""The command line: `moefy convert | eval | bench | sweep | tune | presets | ...` (typer)."""

from moefy.cli.app import app

__all__ = ["app"]
