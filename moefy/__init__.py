"""moefy: turn a dense pretrained transformer into a sparse Mixture-of-Experts model.

    import moefy
    m = moefy.convert("smollm2-135m", "wiki-sample", moefy.MoEConfig(active=0.5))
    moefy.evaluate(m, blocks); moefy.save(m, "runs/smol-moe"); m = moefy.load("runs/smol-moe")
"""

__version__ = "0.1.0"

from moefy.config import DataConfig, MoEConfig  # noqa: E402
from moefy.model import MoEModel  # noqa: E402
from moefy.pipeline.convert import convert
from moefy.eval.evaluate import evaluate  # noqa: E402
from moefy.io import load, save  # noqa: E402

__all__ = ["DataConfig", "MoEConfig", "MoEModel", "convert", "evaluate", "load", "save", "__version__"]
