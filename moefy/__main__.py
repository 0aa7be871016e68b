"""`python -m moefy ...` runs the command line."""

from .cli import app

app()
