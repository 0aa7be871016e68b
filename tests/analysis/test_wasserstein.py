"""Wasserstein neurons: the distance matches scipy, selections, reversible sparsification, CLI."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from typer.testing import CliRunner

from moefy.analysis.wasserstein import gaussian_quantiles, neurons_sparsified, select, w1_to_gaussian
from moefy.arch import family_for
from moefy.cli import app

from conftest import tiny_model


def test_w1_matches_scipy_and_separates_gaussian_from_heavy_tails():
    g = torch.Generator().manual_seed(0)
    n = 4000
    gauss = torch.randn(n, generator=g) * 3 + 1
    heavy = torch.randn(n, generator=g) ** 3
    d = w1_to_gaussian(torch.stack([gauss, heavy], 1))
    q = gaussian_quantiles(n).numpy()
    for col, value in zip((gauss, heavy), d):
        z = ((col - col.mean()) / col.std(unbiased=False)).numpy().astype(np.float64)
        assert float(value) == pytest.approx(wasserstein_distance(z, q), rel=1e-5)
    assert d[0] < 0.05 < 0.3 < d[1]


def test_select():
    d = [torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])]
    assert sorted(select(d, 0.2, "top")[0].tolist()) == [1, 6]
    assert sorted(select(d, 0.2, "bottom")[0].tolist()) == [0, 9]
    assert len(select(d, 0.3, "random")[0].unique()) == 3


def test_sparsifying_neurons_is_reversible_and_local():
    model = tiny_model("llama")
    family = family_for(model.config)
    gate = family.block_list(model)[0].get_submodule(family.w_in).weight
    before = gate.clone()
    inputs = [torch.randn(200, 32) for _ in range(2)]
    chosen = [torch.tensor([3, 7, 11]), torch.tensor([0])]
    with neurons_sparsified(model, inputs, chosen, 0.75):
        assert int((gate[[3, 7, 11]] == 0).sum()) == round(0.75 * 3 * 32)
        others = [i for i in range(64) if i not in (3, 7, 11)]
        assert torch.equal(gate[others], before[others])
    assert torch.equal(gate, before)


def test_cli_writes_json_and_plot(tiny_folder, tmp_path):
    js, png = tmp_path / "w.json", tmp_path / "w.png"
    args = ["analyze", "wasserstein", str(tiny_folder), "--calib", "pydoc", "--calib-tokens", "1024", "--seq-len",
            "32", "--eval-data", "pydoc:heldout", "--eval-tokens", "512", "--json", str(js), "--plot", str(png)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads(js.read_text())
    assert len(result["layers"]) == 2 and len(result["layers"][0]["w1"]) == 64
    assert {"dense_ppl", "top_ppl", "bottom_ppl", "random_ppl"} <= set(result["experiment"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(app, [*args, "--overwrite", "--share", "0.7"])
    assert r.exit_code == 2 and "share" in r.output
