"""What every benchmark shares for its results (not a benchmark itself: a leading underscore keeps it out of
`moe-platform bench`): the --out-json/--out-png options, matplotlib on its file-only backend, and writing the JSON
and the plot of one run.

    add_output_args(p, "checkpoint")                 # --out-json docs/bench_checkpoint.json, --out-png ...png
    save_result(result, args.out_json, args.out_png, plot=plot)

`plot(result)` builds a matplotlib Figure from what the run recorded (`subplots` gives one on the Agg backend);
`save_result` saves and closes it. Both files are written whole or not at all (a temp file renamed over the old one),
so an interrupted run never leaves docs/ with half a JSON. `tool("setup-vllm.sh")` runs one of scripts/setup-*.sh
(which create a peer tool's own venv, or do nothing once it is there) and returns the path it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
if str(REPO / "platform") not in sys.path:
    sys.path.insert(0, str(REPO / "platform"))

from moe_platform.checkpoint.files import atomic_output  # noqa: E402


def tool(script: str) -> str:
    """The path scripts/SCRIPT prints last: a peer tool in a venv of its own, set up if missing."""
    out = subprocess.run(["bash", str(REPO / "scripts" / script)], check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def add_output_args(p: argparse.ArgumentParser, name: str) -> None:
    """--out-json and --out-png, by default docs/bench_`name`.json and .png (the files docs/benchmarks.md shows)."""
    p.add_argument("--out-json", default=str(DOCS / f"bench_{name}.json"), help="where the results go (JSON)")
    p.add_argument("--out-png", default=str(DOCS / f"bench_{name}.png"), help="where the plot goes (PNG)")


def pyplot():
    """matplotlib.pyplot on the Agg backend: benchmarks draw to files, never to a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args, **kwargs):
    """`pyplot().subplots(...)`: (figure, axes) for a `plot(result)` to draw on."""
    return pyplot().subplots(*args, **kwargs)


def save_result(result: dict, out_json: str | Path | None, out_png: str | Path | None = None,
                plot: Callable[[dict], object] | None = None, dpi: int = 100, merge_key: str | None = None,
                keep: Iterable[str] = ()) -> dict:
    """Write `result` as JSON (indent 2, a trailing newline) to `out_json` and `plot(result)`, a matplotlib Figure,
    as `out_png` at `dpi`; print where they went. Returns what was written.

    Where one file holds the runs of several modes, each run written by its own invocation:
    - `merge_key`: `result` goes under that key of the JSON already at `out_json`, its other keys kept;
    - `keep`: those keys of the JSON already at `out_json` are carried over beside `result` (the other mode's run).
    The plot is of `result` alone either way. A falsy `out_json` or `out_png` skips that file."""
    keep = tuple(keep)
    recorded = result
    if out_json and (merge_key is not None or keep):
        path = Path(out_json)
        previous = json.loads(path.read_text()) if path.exists() else {}
        if merge_key is not None:
            recorded = {**previous, merge_key: result}
        else:
            recorded = {**result, **{k: previous[k] for k in keep if k in previous}}
    wrote = []
    if out_json:
        _write(out_json, "w", lambda f: f.write(json.dumps(recorded, indent=2) + "\n"))
        wrote.append(str(out_json))
    if out_png and plot is not None:
        fig = plot(result)
        try:
            fmt = Path(out_png).suffix.lstrip(".") or "png"
            _write(out_png, "wb", lambda f: fig.savefig(f, format=fmt, dpi=dpi))
        finally:
            pyplot().close(fig)
        wrote.append(str(out_png))
    if wrote:
        print(f"wrote {' and '.join(wrote)}")
    return recorded


def _write(path: str | Path, mode: str, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, mode) as f:
        os.fchmod(f.fileno(), 0o644)  # what a plain open() would give it, not the temp file's 0600
        write(f)
