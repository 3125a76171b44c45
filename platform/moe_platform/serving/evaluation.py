"""Evaluation with EleutherAI's lm-evaluation-harness (an optional dependency: `pip install 'moe-platform[eval]'`).

- `run_eval`, behind `moe-platform eval`: lm-eval's own `simple_evaluate` on tasks against a served model (a URL:
  lm-eval's `local-completions` over our OpenAI API, with the server's tokenizer through /tokenize) or in-process on
  a local export or a registry version (`EngineLM`, serving/lm_eval_backend.py); writes lm-eval's results JSON and
  returns one summary line.
- `evaluate_engines`, behind a rollout's eval gate: one task scored on several versions' engines in-process.

Tasks are YAML task files under `include_path` whose data are local files (nothing downloads at run time); with no
`include_path`, lm-eval's own task registry is searched (its tasks download their datasets).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moe_platform.cluster import registry
from moe_platform.serving.engine import Engine

MAX_IN_FLIGHT = 32  # requests an evaluation keeps queued or running on an engine at once


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ValueError("evaluation needs lm-evaluation-harness: pip install 'moe-platform[eval]' (lm-eval)") from None
    return lm_eval


def simple_evaluate(model, tasks: list[str], include_path: str | None, limit: int | None, **kwargs) -> dict:
    """lm-eval's `simple_evaluate` on `tasks` found under `include_path` (a directory of YAML tasks); `model` is an
    lm-eval model name (with `model_args` in kwargs) or an LM object."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a directory of YAML tasks")
    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"under {include_path}" if include_path else "in lm-eval's registry (give --include-path)"
        raise ValueError(f"unknown task(s) {unknown}: no such task {where}")
    kwargs.setdefault("log_samples", False)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit, **kwargs)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def score_of(results: dict, task: str, metric: str | None = None) -> tuple[str, float, bool]:
    """(the metric's key, its value, whether higher is better) of `task` in lm-eval's results; `metric` None: the
    task's first metric."""
    values = results["results"][task]
    if metric is None:
        metric = results["configs"][task]["metric_list"][0]["metric"]
    keys = [k for k in values if k == metric or k.startswith(f"{metric},")]
    if not keys:
        names = sorted({k.split(",")[0] for k in values if "_stderr" not in k and k != "alias"})
        raise ValueError(f"task {task!r} has no metric {metric!r}; it reports {names}")
    higher = results.get("higher_is_better", {}).get(task, {}).get(metric, True)
    return keys[0], float(values[keys[0]]), bool(True if higher is None else higher)


def evaluate_engines(engines: dict[str, Engine], task: str, include_path: str | None, limit: int | None,
                     metric: str | None = None) -> dict:
    """Score `task` on each engine in-process -> {"scores": {name: score}, "metric", "higher_is_better",
    "documents"}."""
    from moe_platform.serving.lm_eval_backend import EngineLM

    scores, key, higher, documents = {}, None, True, 0
    for name, engine in engines.items():
        results = simple_evaluate(EngineLM(engine, max_in_flight=MAX_IN_FLIGHT), [task], include_path, limit,
                                  bootstrap_iters=0)
        key, scores[name], higher = score_of(results, task, metric)
        documents = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    return {"scores": scores, "metric": key, "higher_is_better": higher, "documents": documents}


def _served_model(url: str, headers: dict) -> tuple[str, int]:
    """The model id a server serves (the first of /v1/models) and its context window (from /tokenize)."""
    import httpx

    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            models = http.get("/v1/models")
            if models.status_code != 200:
                raise ValueError(f"{url}/v1/models answered {models.status_code}: {models.text[:200]}")
            name = models.json()["data"][0]["id"]
            probe = http.post("/tokenize", json={"model": name, "prompt": "a"})
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach the server at {url}: {e}") from None
    if probe.status_code != 200:
        raise ValueError(f"{url}/tokenize answered {probe.status_code}: is this a moe-platform (or vLLM) server?")
    return name, int(probe.json()["max_model_len"])


def run_eval(model: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             output: str | Path = "eval_results.json", model_name: str | None = None, api_key: str | None = None,
             concurrency: int = 8, address: str | None = None, bootstrap_iters: int = 100_000) -> str:
    """Evaluate `model` (an http(s):// URL of a running server, registry://NAME[@VERSION], or an export directory)
    on `tasks`; write lm-eval's results JSON to `output` and return the summary line."""
    _lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a directory of YAML tasks")
    if model.startswith(("http://", "https://")):
        url = model.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        served, context = _served_model(url, headers)
        args: dict[str, Any] = {"base_url": f"{url}/v1/completions", "model": model_name or served,
                                "tokenizer_backend": "auto", "max_length": context, "num_concurrent": concurrency,
                                "tokenized_requests": True, "max_retries": 1}
        if api_key:
            args.update(auth_token=api_key, header=headers)
        results = simple_evaluate("local-completions", tasks, include_path, limit, model_args=args,
                                  bootstrap_iters=bootstrap_iters)
    else:
        from moe_platform.serving.lm_eval_backend import EngineLM
        from moe_platform.serving.loader import load_engine

        if registry.is_registry_uri(model):
            registry.connect(address)
        elif not (Path(model) / "config.json").is_file():
            raise ValueError(f"--model {model}: not an export directory (no config.json), a registry://NAME@VERSION "
                             f"or an http(s):// URL of a running server")
        engine = load_engine(model, batch_wait_timeout_s=0.0).start()
        try:
            results = simple_evaluate(EngineLM(engine, max_in_flight=engine.config.max_waiting), tasks, include_path,
                                      limit, bootstrap_iters=bootstrap_iters)
        finally:
            engine.shutdown()
    from lm_eval.utils import handle_non_serializable

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    return summary_line(results, tasks, model, out)


def summary_line(results: dict, tasks: list[str], model: str, out: Path) -> str:
    """One line: each task's metrics (± their standard errors where computed), the model and the results file."""
    parts = []
    for task in tasks:
        values = results["results"][task]
        metrics = []
        for key, value in values.items():
            name, comma, filt = key.partition(",")
            if not comma or "_stderr" in name or not isinstance(value, int | float):
                continue  # not a metric (alias, sample_len) or a standard error
            err = values.get(f"{name}_stderr,{filt}")
            err = f" ± {err:.4f}" if isinstance(err, int | float) and math.isfinite(err) else ""
            metrics.append(f"{name}={value:.4f}{err}")
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        parts.append(f"{task}: {' '.join(metrics)} ({n} documents)")
    return f"{'; '.join(parts)} | model {model} | results {out}"
