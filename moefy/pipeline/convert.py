"""The conversion pipeline, top to bottom:
profile activations -> group neurons into experts -> build routers -> swap FFN for MoE
(-> refit the down rows, when asked: refit.py)."""

from __future__ import annotations

from moefy import presets, provenance
from moefy.config import DataConfig, MoEConfig
from moefy.errors import ConfigError
from moefy.model import MoEModel
from moefy.pipeline import load as models
from moefy.pipeline.build import build
from moefy.pipeline.calibrate import calibrate
from moefy.pipeline.layerwise import convert_layers


def convert(model, calib: str | None = None, moe: MoEConfig | None = None,
            data: DataConfig | None = None, *, preset: str | None = None, tokenizer=None, progress: bool = False,
            layerwise=None) -> MoEModel:
    """Turn a dense model (a name/path for models.load, a models.LoadedModel, or a transformers
    model with its tokenizer) into an MoE model, using calibration text `calib`.
    The settings: `moe` and `data` where given, else those of the preset (presets.py; None: the
    recommended one), with `calib` as its calibration text when given.
    layerwise (a layerwise.LayerwiseConfig): calibrate and build one block at a time instead of
    profiling the whole model first (same result with propagate="dense"; see layerwise.py)."""
    recipe = presets.get(preset)
    moe = moe or recipe.moe_config()
    data = data or recipe.data_config(source=calib)
    if isinstance(model, str):
        model = models.load(model)
    if isinstance(model, models.LoadedModel):
        model, tokenizer, source = model.model, model.tokenizer, model.source
        weights = provenance.weights_hash(source, model)
    else:
        source = getattr(model.config, "_name_or_path", "") or type(model).__name__
        weights = provenance.weights_hash(None, model)  # the model in memory, whatever its origin
    if tokenizer is None:
        raise ConfigError("convert() needs the tokenizer along with a loaded model")
    record = {"source": source, "source_weights": weights}
    if layerwise is not None:
        return convert_layers(model, tokenizer, moe, data, layerwise, record=record, progress=progress)
    stats = calibrate(model, tokenizer, moe, data, progress=progress)
    return build(model, tokenizer, stats, moe, record={**record, "calibration": stats.record}, progress=progress)


