"""moefy: turn a dense pretrained transformer into a sparse Mixture-of-Experts model.

    import moefy
    loaded = moefy.load_model("smollm2-135m")          # or a Hugging Face folder / a .gguf file
    m = moefy.convert(loaded, preset="balanced")      # a MoEModel; moefy.presets.names() lists the recipes
    moefy.save(m, "runs/smol-moe"); m = moefy.load("runs/smol-moe")
    print(moefy.evaluate(m, "wiki-sample:heldout"))
"""

__version__ = "0.1.0"

from moefy.config import DataConfig, MoEConfig  # noqa: E402
from moefy.eval.evaluate import evaluate  # noqa: E402
from moefy.io import load, save  # noqa: E402
from moefy.model import MoEModel  # noqa: E402
from moefy.pipeline.convert import convert  # noqa: E402
from moefy.pipeline.load import load as load_model  # noqa: E402
from moefy import presets  # noqa: E402  (presets.names(), presets.get(name))
from moefy.tuning.distill import TuneConfig, tune  # noqa: E402

__all__ = ["DataConfig", "MoEConfig", "MoEModel", "TuneConfig", "convert", "evaluate", "load", "load_model",
           "presets", "save", "tune", "__version__"]
