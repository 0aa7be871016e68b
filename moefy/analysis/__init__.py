"""Analyses of a dense model's neurons (not part of the conversion pipeline)."""
