"""Analyses of a dense model's neurons and of a converted model's routing (not part of the conversion pipeline)."""
