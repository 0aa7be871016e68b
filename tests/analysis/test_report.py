"""`moefy report`: the page, its figures and the self-contained HTML, from measurements and from
the JSON files other commands write (the real ones in benchmarks/results)."""

import json
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from moefy.analysis import consistency, specialisation
from moefy.cli import app

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results"
FAST = ["--data", "pydoc:heldout", "--data", "pydoc:calib", "--tokens", "512", "--seq-len", "64", "--m", "4",
        "--m", "16", "--eval-tokens", "256", "--active", "0.5", "--active", "1.0"]


def test_report_measured(tiny_run, tmp_path):
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert set(pngs) == {"quality.png", "usage.png", "consistency.png", "specialisation.png"}
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    for section in ("Quality vs compute", "Expert usage", "Routing consistency", "Specialisation by domain"):
        assert f"## {section}" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 4 and ".png\"" not in html and "<table>" in html
    numbers = json.loads((out / "report.json").read_text())
    q = {row["active_target"]: row for row in numbers["quality"]}
    assert q[0.5]["moe"]["active_ffn_share"] <= 0.5 + 1e-9 and q[1.0]["moe"]["mean_k"] > q[0.5]["moe"]["mean_k"]
    assert q[0.5]["dense"] == q[1.0]["dense"]  # one dense run for every point
    assert numbers["consistency"]["segments"] == [4, 16] and len(numbers["specialisation"]["layers"]) == 2
    r = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(out), *FAST])
    assert r.exit_code == 2 and "--overwrite" in r.output


def test_report_from_json_files(tiny_run, tmp_path):
    """Sweep, bench and Wasserstein JSONs as the real commands wrote them; the analyses from JSON
    too (so the report runs no model pass at all)."""
    g = torch.Generator().manual_seed(0)
    route = lambda B: torch.zeros(B, 32, 8, dtype=torch.bool).scatter_(  # noqa: E731
        -1, torch.randn(B, 32, 8, generator=g).topk(3, -1).indices, True)
    c, s = tmp_path / "c.json", tmp_path / "s.json"
    c.write_text(json.dumps({"data": "x", **consistency.analyse([route(2), route(2)], segments=(4, 8))}))
    s.write_text(json.dumps(specialisation.analyse({"a": [route(2), route(2)], "b": [route(2), route(2)]})))
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(out), *FAST, "--sweep", str(RESULTS / "sweep_wiki.json"),
                                 "--bench", str(RESULTS / "bench_smol384_a50_t1.json"),
                                 "--wasserstein", str(RESULTS / "wasserstein.json"),
                                 "--consistency", str(c), "--specialisation", str(s)])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    assert "## Wasserstein neurons" in md and "## Speed" in md and "tok/s" in md
    assert "coactivation/mlp 384+0.1 shared" in md  # the sweep's variants, not measured points
    assert "| 8 |" in md and "a vs b" in md  # the analyses' own numbers
    assert (out / "wasserstein.png").exists()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 5
    one = tmp_path / "one"  # one text: usage measured, consistency from the JSON, no specialisation
    r = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(one), "--data", "pydoc:heldout", "--tokens",
                                 "256", "--sweep", str(RESULTS / "sweep_wiki.json"), "--consistency", str(c)])
    assert r.exit_code == 0, r.output
    assert "give two --data texts" in (one / "report.md").read_text() and (one / "usage.png").exists()


def test_report_bad_inputs(tiny_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": 1}')
    out = tmp_path / "report"
    for args, message in ((["--bench", str(bad)], "moefy bench"), (["--sweep", str(tmp_path / "none.json")], "cannot read"),
                          (["--active", "0"], "active shares"), (["--seq-len", "8"], "segment lengths")):
        r = CliRunner().invoke(app, ["report", str(tiny_run), "--out", str(out), *FAST, *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
