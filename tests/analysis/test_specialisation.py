"""Expert specialisation by domain: the overlap measures on hand-computed cases, the analysis on
a tiny model's routing, and the `moefy analyze specialisation` command."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moefy.analysis.specialisation import analyse, compare, halves
from moefy.cli import app


def test_compare_hand_computed():
    # a uses experts 0 and 1, b uses 0 and 2, equally often. Top-2 sets {0, 1} and {0, 2}: Jaccard 1/3.
    # p_a = [.5, .5, 0, 0], p_b = [.5, 0, .5, 0]: TV 0.5; mixture [.5, .25, .25, 0], KL of each to it
    # 0.5 bit, so JS 0.5. a's set holds all of a and half of b; experts 1 and 2 lean (used by one only).
    r = compare(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.5, 0.0, 0.5, 0.0]), 2)
    assert r["jaccard"] == pytest.approx(1 / 3) and r["tv"] == pytest.approx(0.5) and r["js"] == pytest.approx(0.5)
    assert r["coverage_self"] == pytest.approx(1.0) and r["coverage_other"] == pytest.approx(0.5)
    assert r["leaning"] == 2


def test_compare_identical_and_disjoint():
    u = torch.tensor([0.9, 0.5, 0.3, 0.2, 0.1, 0.0])
    same = compare(u, u, 3)
    assert same["jaccard"] == 1 and same["js"] == pytest.approx(0, abs=1e-12) and same["tv"] == 0
    assert same["coverage_self"] == same["coverage_other"] and same["leaning"] == 0
    apart = compare(torch.tensor([0.6, 0.4, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.7, 0.3]), 2)
    assert apart["jaccard"] == 0 and apart["js"] == pytest.approx(1) and apart["tv"] == pytest.approx(1)
    assert apart["coverage_other"] == 0


def routing(B, L, E, k, prefer, seed):
    """Top-k routing that favours the experts in `prefer`."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, E, generator=g)
    scores[..., prefer] += 1.5
    return torch.zeros(B, L, E, dtype=torch.bool).scatter_(-1, scores.topk(k, -1).indices, True)


def test_analyse_separates_domains_above_the_noise_floor():
    E, k = 16, 4
    # Layer 0: both domains route alike; layer 1: they prefer different experts.
    a = [routing(6, 32, E, k, [0, 1, 2, 3], 0), routing(6, 32, E, k, [0, 1, 2, 3], 1)]
    b = [routing(4, 32, E, k, [0, 1, 2, 3], 2), routing(4, 32, E, k, [8, 9, 10, 11], 3)]
    r = analyse({"a": a, "b": b})
    assert r["tokens"] == {"a": 4 * 32, "b": 4 * 32}  # cut to equal token counts
    same, apart = r["layers"]
    assert same["top_n"] == k and apart["jaccard"] < same["jaccard"]
    assert apart["js"] > 5 * apart["within"]["js"] and apart["js"] > 5 * same["js"]
    assert apart["coverage_self"] > apart["coverage_other"]
    assert len(same["usage"]["a"]) == E and sum(same["usage"]["b"]) == pytest.approx(k, abs=1e-3)
    assert [d["layers"] for d in r["by_depth"]] == [[0, 0], [1, 1]]


def test_halves():
    x = torch.zeros(5, 8, 3)
    assert [len(h) for h in halves(x)] == [2, 3]
    one = halves(torch.zeros(1, 9, 3))
    assert one[0].shape == one[1].shape == (1, 4, 3)


def test_cli(tiny_run, tmp_path):
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    args = ["analyze", "specialisation", str(tiny_run), "--data", "pydoc:calib", "--data", "pydoc:heldout",
            "--tokens", "512", "--seq-len", "32", "--json", str(js), "--plot", str(png)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads(js.read_text())
    assert result["domains"] == ["pydoc:calib", "pydoc:heldout"] and len(result["layers"]) == 2
    assert 0 <= result["layers"][1]["js"] <= 1 and png.stat().st_size > 10_000
    r = CliRunner().invoke(app, ["analyze", "specialisation", str(tiny_run), "--data", "pydoc:calib",
                                 "--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "exactly two" in r.output and not (tmp_path / "x.json").exists()
