"""`python -m moefy ...` runs the command line."""

from moefy.cli import app

app()
