"""moefy: turn a dense pretrained transformer into a sparse Mixture-of-Experts model.

    import moefy
    m = moefy.convert("smollm2-135m", "wiki-sample", moefy.MoEConfig(active=0.5))
    moefy.evaluate(m, blocks); moefy.save(m, "runs/smol-moe"); m = moefy.load("runs/smol-moe")
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"DataConfig": "config", "MoEConfig": "config", "MoEModel": "convert", "convert": "convert",
            "evaluate": "evaluate", "load": "io", "save": "io"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):  # imported on first use, so `moefy --help` does not import torch
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'moefy' has no attribute {name!r}")
