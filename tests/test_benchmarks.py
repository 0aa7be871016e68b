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
