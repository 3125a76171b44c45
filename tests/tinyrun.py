"""The tiny training set-up the tests share: a small corpus and config overrides that train in seconds on 2 cores.

A module of its own (not conftest) so test files in every folder can import it by a unique name.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_text(limit: int = 120_000) -> str:
    """A slice of tinyshakespeare (or, without ../shared, of a stdlib module)."""
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text()[:limit]
    import argparse

    return Path(argparse.__file__).read_text()[:limit]


def tiny_overrides(corpus: Path, storage: Path, **extra) -> list[str]:
    base = {
        "run.name": "t", "run.storage_path": str(storage),
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.intermediate_size": 48, "model.num_experts": 4, "model.top_k": 2, "model.max_seq_len": 64,
        "data.path": str(corpus), "data.vocab_size": 320, "data.cache_dir": str(storage / "cache"),
        "train.steps": 12, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.seq_len": 32,
        "train.warmup": 2, "train.lr": 3e-3, "checkpoint.interval": 6, "checkpoint.keep": 2,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def poll(condition, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Wait until `condition()` is true; a TimeoutError naming `what` after `timeout_s` (never a fixed sleep)."""
    import time

    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def run_events(run_dir: Path) -> list[dict]:
    """The run's events.jsonl (starts, resumes, checkpoint-and-stops), [] before the first."""
    import json

    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_in_background(fn) -> tuple:
    """Run `fn()` on a daemon thread; returns (thread, out): out["result"] gets its value, out["error"] its error."""
    import threading

    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # reported by the caller
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def cluster_processes(state: Path | str) -> list[int]:
    """Processes of the cluster that scripts/cluster-up.sh started with STATE_DIR `state`: every process it starts
    inherits MOE_CLUSTER_STATE=<state>."""
    marker = f"MOE_CLUSTER_STATE={state}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids
