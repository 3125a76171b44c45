"""docs/benchmarks.md shows exactly the figures of the runs committed beside it: every table there is what its
docs/bench_NAME.json renders to (bench/_tables.py), and every benchmark has its JSON and its plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", REPO / "bench" / "_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLES = _tables()


def test_every_benchmark_json_has_a_table_and_a_plot():
    recorded = sorted(p.stem.removeprefix("bench_") for p in DOCS.glob("bench_*.json"))
    benchmarks = sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_"))
    assert recorded == benchmarks == sorted(TABLES.RENDER)
    for name in recorded:
        assert (DOCS / f"bench_{name}.png").is_file(), name
        assert f"(bench_{name}.png)" in (DOCS / "benchmarks.md").read_text(), f"{name}: plot not shown"


@pytest.mark.parametrize("name", sorted(TABLES.RENDER))
def test_the_markdown_shows_the_committed_figures(name):
    rendered = TABLES.render(name)
    assert rendered in (DOCS / "benchmarks.md").read_text(), (
        f"docs/benchmarks.md does not show what docs/bench_{name}.json holds; paste this (python bench/_tables.py "
        f"{name}):\n{rendered}")


def test_a_changed_figure_is_caught(tmp_path):
    """The check can fail: one figure changed in the JSON renders to a table the docs do not hold."""
    import json

    data = json.loads((DOCS / "bench_layouts.json").read_text())
    data["rows"][0]["tokens_per_s"] += 1.0
    (tmp_path / "bench_layouts.json").write_text(json.dumps(data))
    assert TABLES.render("layouts", tmp_path) not in (DOCS / "benchmarks.md").read_text()
