"""The Ray Serve application: a thin deployment around `Engine`, routing FastAPI endpoints to `OpenAIFrontend`.

Run it with `serve run serve/config.yaml` / `serve deploy serve/config.yaml` (import path
`moe_platform.serving.app:build_app`), with `moe-platform serve` (`start_server`, stopped on SIGTERM or SIGINT), or
from Python with `run_server(model_dir)`.

Operations:
- overload: the engine's bounded queue answers 429 JSON with Retry-After; `max_ongoing_requests` and
  `max_queued_requests` bound what Serve itself queues in front of a replica (its rejections are 429 + Retry-After too);
- health: `check_health` fails when the engine loop died, so Serve replaces the replica;
- hot model update: change `user_config: {model: NEW_EXPORT}` and redeploy; `reconfigure` loads the new export next to
  the running engine, switches new requests to it, and lets the old engine finish what it accepted (no failures);
- LoRA adapters: with `engine: {max_loras: N}`, `adapters: {NAME: DIR or registry://...}` (args or user_config) are
  served as model `MODEL_NAME:NAME` beside the base model, mixed in one batch; changing user_config's `adapters`
  loads and unloads them on every replica without a restart; `POST /v1/load_lora_adapter` and
  `/v1/unload_lora_adapter` (admin key) do it on the replica that takes the call;
- models from the object-store registry: `model: registry://NAME[@VERSION]` (args or user_config) loads a version
  published with `moe_platform.cluster.registry.publish_export` straight from the object store (no files, zero-copy
  on the node); `build_app` pins `registry://NAME` (latest) to the version current at build time, so every replica
  of a deployment serves the same weights;
- several versions at once (canary, blue-green): `versions: {NAME: DIR or registry://...}` are served beside
  `model` (named `version`) on every replica, each by its own engine; `traffic: {VERSION: PERCENT}` (args, or
  user_config to move it without a restart) splits requests between them (moe_platform.serving.traffic);
  `MODEL_NAME@VERSION` pins one, an `X-Session-Id` header keeps a conversation on one version, adapter requests
  stay on `model`, and every answer names its version in the `X-Model-Version` header;
- metrics: time to first token, inter-token latency, queue depth, batch size, tokens/s and per-expert load go to
  `ray.util.metrics` (Prometheus via Ray's metrics export).
"""


import asyncio
import dataclasses
import logging
import os
import random
import re
import threading
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application
from ray.util import metrics as ray_metrics

from moe_platform.cluster import registry
from moe_platform.serving import rollout_controller
from moe_platform.serving.app_metrics import AppMetrics
from moe_platform.serving.engine import Engine, EngineConfig, SamplingParams
from moe_platform.serving.errors import EngineUnavailableError, InvalidRequestError, NotFoundError, ServingError
from moe_platform.serving.loader import load_engine
from moe_platform.serving.openai_api import (
    DEFAULT_MAX_BODY_BYTES,
    OpenAIFrontend,
    error_response,
    install_error_handlers,
)
from moe_platform.serving.rollout import RolloutError, known_split, read_probe_file
from moe_platform.serving.traffic import PERCENT, StickySessions, TrafficSplit, UnknownVersionError

logger = logging.getLogger("ray.serve")
DEFAULT_MODEL_NAME = "moe-platform"
_LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_MAX_SAMPLES_PER_EXPORT = 2000  # bounds the metric-export cost per interval; the distribution stays unbiased

fastapi_app = FastAPI(title="moe-platform", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(fastapi_app)


_VERSION_NAME = r"[A-Za-z0-9._-]+"


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config), validated; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str = Field(description="export directory (config.json, model.safetensors, tokenizer files) or "
                                   "registry://NAME[@VERSION] (a version published to the object-store registry)")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="the model id clients send and /v1/models lists")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <api_key>' on /v1/*")
    admin_api_key: str | None = Field(None, description="key of the admin routes (/admin/rollout, adapter load/"
                                      "unload); never api_key: without it they are off (403)")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters to load at start, name -> "
                                     "directory or registry://NAME[@VERSION]; needs engine.max_loras")
    version: str = Field("stable", pattern=rf"^{_VERSION_NAME}$",
                         description="the version name of `model` (clients pin it as MODEL_NAME@VERSION)")
    versions: dict[str, str] = Field(default_factory=dict, description="more versions served beside `model`, on "
                                     "every replica: name -> export directory or registry://NAME[@VERSION]")
    traffic: dict[str, int] = Field(default_factory=dict, description="percent of requests per version (whole "
                                    "numbers summing to 100); default: all to `version`")
    audit_log: str | None = Field(None, description="the rollout audit log (JSONL) of the app; default: "
                                  "rollouts/APP.audit.jsonl under the directory the app is built in")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, description="larger request bodies get 413")
    metrics_interval_s: float = Field(1.0, gt=0, description="seconds between engine-stat exports to Ray metrics")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine options (EngineConfig, the one "
                                                                            "definition of their names and defaults)")
    # Deployment options (a Serve config's `deployments:` section overrides these).
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (ignored when autoscaling)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound; set with max_replicas")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(48.0, gt=0, description="autoscaling target per replica")
    max_ongoing_requests: int = Field(384, ge=1, description="requests a replica holds at once (Serve)")
    max_queued_requests: int = Field(512, ge=-1, description="requests Serve queues per caller before 429")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (engine.device auto then uses one)")
    priority_over_training: bool = Field(True, description="reserve replica resources ahead of elastic training "
                                                           "jobs on the cluster (moe_platform.cluster.arbiter)")

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_adapters(value)

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, value):
        if isinstance(value, EngineConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"engine must be a mapping of engine options, got {type(value).__name__}")
        return EngineConfig.from_options(**value)  # unknown keys and bad values are errors naming the option

    @model_validator(mode="after")
    def _split(self):
        bad = sorted(v for v in self.versions if not re.fullmatch(_VERSION_NAME, v) or v == self.version)
        if bad:
            raise ValueError(f"versions {bad}: names are letters, digits, '.', '_' or '-', and differ from version "
                             f"{self.version!r} (the name of `model`)")
        TrafficSplit.of(self.traffic or {self.version: PERCENT}, [self.version, *self.versions])  # says what is wrong
        return self

    @model_validator(mode="after")
    def _keys(self):
        if self.admin_api_key and self.admin_api_key == self.api_key:
            raise ValueError("admin_api_key must differ from api_key: every API client holds the API key, and the "
                             "admin key moves traffic and loads models")
        return self

    def engine_options(self) -> dict:
        return dataclasses.asdict(self.engine)

    def deployment_options(self) -> dict:
        opts: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})},
        }
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas to autoscale (or neither)")
        if self.min_replicas is not None:
            if self.min_replicas > self.max_replicas:
                raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
            opts["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                          "target_ongoing_requests": self.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class _RayMetrics:
    """Engine statistics -> ray.util.metrics, exported from a background thread every `interval` seconds, tagged
    with the model name and the version each engine serves."""

    def __init__(self, model_name: str):
        tags = ("model", "version")
        self.model_name = model_name
        self.ttft = ray_metrics.Histogram("moe_serve_time_to_first_token_s", "time to first token (s)",
                                          _LATENCY_BOUNDARIES, tags)
        self.itl = ray_metrics.Histogram("moe_serve_inter_token_latency_s", "time between two tokens of a request (s)",
                                         _LATENCY_BOUNDARIES, tags)
        self.latency = ray_metrics.Histogram("moe_serve_request_latency_s", "time from a request's arrival to its "
                                             "last token (s)", _LATENCY_BOUNDARIES, tags)
        self.requests = ray_metrics.Counter("moe_serve_requests", "finished requests by HTTP status class",
                                            ("model", "version", "status"))
        self.queue = ray_metrics.Gauge("moe_serve_queue_depth", "requests waiting for a batch slot", tags)
        self.batch = ray_metrics.Gauge("moe_serve_running_batch_size", "sequences in the running batch", tags)
        self.kv_usage = ray_metrics.Gauge("moe_serve_kv_cache_usage_perc", "fraction of the KV cache's blocks (or "
                                          "slots) held by running requests (0..1)", tags)
        self.tps = ray_metrics.Gauge("moe_serve_tokens_per_s", "generated tokens per second (10 s window)", tags)
        self.prefix_hit_rate = ray_metrics.Gauge("moe_serve_prefix_cache_hit_rate", "prompt tokens found in the "
                                                 "prefix cache over prompt tokens looked up, since the engine "
                                                 "started (0..1)", tags)
        self.preemptions = ray_metrics.Counter("moe_serve_preemptions", "running requests preempted for KV blocks "
                                               "(recomputed later)", tags)
        self.tokens = ray_metrics.Counter("moe_serve_generated_tokens", "generated tokens", tags)
        self.expert = ray_metrics.Counter("moe_serve_expert_tokens", "tokens routed to each expert",
                                          ("model", "version", "layer", "expert"))
        self.imbalance = ray_metrics.Gauge("moe_serve_expert_load_imbalance",
                                           "max over mean expert load per layer, worst layer", tags)
        self._last: dict[int, tuple[int, list[list[int]], int]] = {}

    def export(self, engine: Engine, version: str = "") -> tuple[dict, list[float]]:
        """Export `engine`'s statistics; return them and the time-to-first-token samples it drained."""
        tags = {"model": self.model_name, "version": version}
        stats = engine.stats()
        self.queue.set(stats["waiting"], tags)
        self.batch.set(stats["running"], tags)
        self.kv_usage.set(stats["kv_cache_usage"], tags)
        self.tps.set(stats["tokens_per_s"], tags)
        queries = stats["prefix_cache_queries"]
        self.prefix_hit_rate.set(stats["prefix_cache_hits"] / queries if queries else 0.0, tags)
        ttft, itl = engine.drain_latency_samples()
        for samples, hist in ((ttft, self.ttft), (itl, self.itl)):
            for value in _sampled(samples):
                hist.observe(value, tags)
        prev_tokens, prev_load, prev_preempted = self._last.get(id(engine), (0, None, 0))
        if stats["generated_tokens"] > prev_tokens:
            self.tokens.inc(stats["generated_tokens"] - prev_tokens, tags)
        if stats["num_preemptions"] > prev_preempted:
            self.preemptions.inc(stats["num_preemptions"] - prev_preempted, tags)
        load = stats["expert_load"]
        worst = 0.0
        for layer, row in enumerate(load):
            for expert, count in enumerate(row):
                delta = count - (prev_load[layer][expert] if prev_load else 0)
                if delta > 0:
                    self.expert.inc(delta, {**tags, "layer": str(layer), "expert": str(expert)})
            mean = sum(row) / len(row)
            worst = max(worst, max(row) / mean if mean else 0.0)
        self.imbalance.set(worst, tags)
        self._last[id(engine)] = (stats["generated_tokens"], load, stats["num_preemptions"])
        return stats, ttft

    def export_requests(self, version: str, counts: dict[str, int], latency: list[float]) -> None:
        tags = {"model": self.model_name, "version": version}
        for status, n in counts.items():
            self.requests.inc(n, {**tags, "status": status})
        for value in _sampled(latency):
            self.latency.observe(value, tags)

    def forget(self, engines) -> None:
        """Drop the delta state of engines no longer served."""
        keep = {id(e) for e in engines}
        self._last = {k: v for k, v in self._last.items() if k in keep}


def _sampled(samples: list[float]) -> list[float]:
    return random.sample(samples, _MAX_SAMPLES_PER_EXPORT) if len(samples) > _MAX_SAMPLES_PER_EXPORT else samples


class _RequestLog:
    """Finished requests per version since the last `take` (thread-safe): status classes and latencies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}

    def observe(self, version: str | None, status: int, seconds: float) -> None:
        with self._lock:
            entry = self._data.setdefault(version or "", {"counts": {}, "latency": []})
            key = f"{status // 100}xx"
            entry["counts"][key] = entry["counts"].get(key, 0) + 1
            if status < 400 and len(entry["latency"]) < 4 * _MAX_SAMPLES_PER_EXPORT:
                entry["latency"].append(seconds)

    def take(self) -> dict[str, dict]:
        with self._lock:
            data, self._data = self._data, {}
        return data


class RolloutRequestError(ServingError):
    """A rollout command the controller refused (400 invalid, 409 one is running)."""

    type = "invalid_request_error"

    def __init__(self, message: str, code: str, status: int):
        super().__init__(message, code=code)
        self.status = status


def _check_adapters(value) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in value.items()):
        raise ValueError(f"adapters must map adapter names to directories or registry:// references, got {value!r}")
    return value


def _identity(model: str | None) -> str | None:
    """What a model reference names, for "is this the model already loaded?" (`serve.deployment` pickles the class
    below when it is defined, so what its methods use must be defined above it)."""
    return model if model is None or registry.is_registry_uri(model) else str(Path(model).resolve())


@serve.deployment(
    # build_app sets these from AppArgs; the defaults here are AppArgs' own, for a bare `serve run` of the class
    max_ongoing_requests=AppArgs.model_fields["max_ongoing_requests"].default,
    max_queued_requests=AppArgs.model_fields["max_queued_requests"].default,
    backpressure_config={"status_code": 429, "retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
)
@serve.ingress(fastapi_app)
class MoEServer:
    """One replica: an engine (swappable by `reconfigure`) behind the OpenAI frontend."""

    def __init__(self, model: str, engine_options: dict, model_name: str = DEFAULT_MODEL_NAME,
                 api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 metrics_interval_s: float = 1.0, base_dir: str = ".", adapters: dict[str, str] | None = None,
                 admin_api_key: str | None = None, version: str = "stable", versions: dict[str, str] | None = None,
                 traffic: dict[str, int] | None = None, audit_log: str | None = None):
        self._engine_options = dict(engine_options)
        self._base_dir = Path(base_dir)  # where build_app ran: relative user_config paths resolve against it
        self._engine = self._load(model)
        self._adapters: dict[str, str] = {}  # what the deployment declares (args, then user_config)
        self._sync_adapters(self._engine, adapters or {})
        self._engine.start()
        self._swap_lock = threading.Lock()
        # Other versions beside `model` (`version`): each its own engine; requests split by `traffic`.
        self._version = version
        self._others: dict[str, Engine] = {}
        self._sources: dict[str, str] = {version: str(model), **{k: str(v) for k, v in (versions or {}).items()}}
        for name, source in (versions or {}).items():  # as build_app resolved them
            self._others[name] = self._load(source)
            self._others[name].start()
        self._config_split = self._check_split(traffic or {version: PERCENT})
        self._split = self._config_split
        self._sessions = StickySessions()
        self._requests = _RequestLog()
        self.frontend = OpenAIFrontend(lambda: self._engine, model_name, api_key, max_body_bytes, admin_api_key,
                                       pick=self._pick, observe=self._requests.observe, rollout=self._rollout_admin)
        self._metrics = _RayMetrics(model_name)
        # Rollouts: the app's controller actor (moe_platform.serving.rollout_controller) owns the split while one
        # runs and after it ends; replicas sync with it every interval.
        context = serve.get_replica_context()
        self._app, self._replica = context.app_name, context.replica_id.unique_id
        log = Path(audit_log or self._base_dir / "rollouts" / f"{self._app}.audit.jsonl")
        self._controller = rollout_controller.controller(self._app, model_name, str(log),
                                                         replica_ttl_s=max(10.0, 5 * metrics_interval_s))
        self._loading: dict[str, str] = {}  # versions loading on the controller's behalf -> "" or their error
        self._probe_result: dict | None = None
        self._stop = threading.Event()
        self._metrics_thread = threading.Thread(target=self._background, args=(metrics_interval_s,),
                                                name="moe-metrics", daemon=True)
        self._metrics_thread.start()

    def _check_split(self, traffic: dict[str, int]) -> TrafficSplit:
        return TrafficSplit.of(traffic, [self._version, *self._others])

    def _pick(self, pinned: str | None, session: str | None, adapter: str | None) -> tuple[Engine, str]:
        """The version of one request: the pinned one, else by session and traffic; adapter requests stay on the
        engine their adapters are loaded on (`model`'s)."""
        if pinned is not None:
            version = pinned
        elif adapter is not None or not self._others:
            version = self._version
        else:
            version = self._sessions.route(self._split, session)
        if version == self._version:
            return self._engine, version
        engine = self._others.get(version)
        if engine is None:
            raise NotFoundError(f"the model version '{pinned}' does not exist; this server serves "
                                f"{sorted([self._version, *self._others])}", param="model", code="model_not_found")
        return engine, version

    # -- background: metrics and the rollout controller ----------------------------------------------------------
    def _background(self, interval: float) -> None:
        warned = False
        while not self._stop.wait(interval):
            try:
                engines, stats = self._export_metrics()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("exporting serving metrics failed")
                engines, stats = {}, {}
            try:
                answer = ray.get(self._controller.sync.remote(
                    self._replica, self._version, self._version_report(), stats, self._probe_result, engines),
                    timeout=30)
                warned = False
            except Exception as e:  # noqa: BLE001 - a controller that is away leaves the split as it is
                if not warned:
                    logger.warning("the rollout controller did not answer (%s); the traffic split stays", e)
                    warned = True
                continue
            self._follow(answer)

    def _export_metrics(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Export every engine's and version's metrics; return, per version, its engine's state and the requests
        finished since the last call, for the controller."""
        engines = {self._version: self._engine, **self._others}
        self._metrics.forget(engines.values())
        requests = self._requests.take()
        stats: dict[str, dict] = {}
        state: dict[str, dict] = {}
        for version, engine in engines.items():
            now, ttft = self._metrics.export(engine, version)
            state[version] = {k: now[k] for k in AppMetrics.ENGINE_KEYS}
            done = requests.pop(version, {"counts": {}, "latency": []})
            self._metrics.export_requests(version, done["counts"], done["latency"])
            counts = done["counts"]
            stats[version] = {"requests": counts.get("2xx", 0) + counts.get("5xx", 0), "errors": counts.get("5xx", 0),
                              "latency": done["latency"], "ttft": ttft}
        return state, stats

    def _version_report(self) -> dict[str, dict]:
        report = {name: {"ready": self._healthy(engine), "base": engine.base_fingerprint(),
                         "source": self._sources.get(name)}
                  for name, engine in {self._version: self._engine, **self._others}.items()}
        for name, error in list(self._loading.items()):
            report.setdefault(name, {"ready": False, "source": self._sources.get(name), **({"error": error}
                                                                                            if error else {})})
        return report

    @staticmethod
    def _healthy(engine: Engine) -> bool:
        try:
            engine.check_health()
        except RuntimeError:
            return False
        return True

    def _follow(self, answer: dict) -> None:
        """Apply the controller's answer: load the versions it names, run its probe, take its split."""
        for name, source in answer.get("sources", {}).items():
            if name != self._version and name not in self._others and name not in self._loading:
                self._loading[name] = ""
                self._sources[name] = source
                threading.Thread(target=self._load_version, args=(name, source), daemon=True,
                                 name=f"moe-load-{name}").start()
        probe = answer.get("probe")
        if probe and (self._probe_result or {}).get("id") != probe["id"]:
            self._probe_result = self._run_probe(probe)
        split = known_split(answer.get("weights"), [self._version, *self._others])
        self._split = split or self._config_split

    def _load_version(self, name: str, source: str) -> None:
        try:
            target = source if registry.is_registry_uri(source) else str(self._base_dir / Path(source).expanduser())
            engine = self._load(target).start()
            engine.generate("\n", SamplingParams(max_tokens=1, temperature=0))  # health check: one real token
        except Exception as e:  # noqa: BLE001 - reported to the controller, which rolls back
            logger.exception("loading version %r from %s failed", name, source)
            # what the rollout status (an admin route) shows: no server path, no word on what exists there
            self._loading[name] = f"version {name!r} could not be loaded ({type(e).__name__}; the replica log says why)"
            return
        self._others = {**self._others, name: engine}  # a new dict: request threads iterate the old one
        del self._loading[name]

    def _run_probe(self, probe: dict) -> dict:
        engines = {self._version: self._engine, **self._others}
        losses = {}
        for version in probe["versions"]:
            if version in engines:
                try:
                    losses[version] = engines[version].score(probe["prompts"])
                except Exception as e:  # noqa: BLE001 - a version that cannot score fails the gate
                    logger.warning("quality probe of %r failed: %s", version, e)
                    losses[version] = float("inf")
        return {"id": probe["id"], "losses": losses}

    async def _rollout_admin(self, action: str, body: dict) -> dict:
        """The admin route's rollout commands, carried out by the app's controller (every replica follows)."""
        by = f"admin-route:{body.get('by') or 'admin'}"
        try:
            ask = rollout_controller.ask
            if action == "status":
                return await ask(self._controller.status.remote())
            if action == "start":
                try:
                    spec = read_probe_file({k: v for k, v in body.items() if k not in ("action", "by")}, self._base_dir)
                except RolloutError as e:  # its message names the server path and what is (not) there: logged only
                    logger.warning("admin rollout start: %s", e)
                    raise RolloutError("gates.quality.file could not be read as probe prompts on this server (the "
                                       "replica log says why)") from None
                return await ask(self._controller.start.remote(spec, by))
            if action == "traffic":
                weights = body.get("weights")
                if not isinstance(weights, dict):
                    raise InvalidRequestError("weights ({VERSION: PERCENT, ...}) is required", param="weights")
                return await ask(self._controller.set_split.remote(weights, by))
            if action in ("promote", "abort"):
                method = getattr(self._controller, action)
                return await ask(method.remote(by, body.get("reason") or f"{action}d over the admin route"))
        except UnknownVersionError as e:
            raise NotFoundError(str(e), param="to", code="model_not_found") from None
        except RolloutError as e:
            raise RolloutRequestError(str(e), code=e.code, status=e.status) from None
        raise InvalidRequestError(f"unknown rollout action {action!r}; use start, status, promote, abort or traffic",
                                  param="action")

    def _load(self, model: str | registry.ModelVersion) -> Engine:
        return load_engine(model, **self._engine_options)

    async def reconfigure(self, user_config: dict) -> None:
        """`user_config: {model: DIR or registry://NAME[@VERSION], adapters: {NAME: DIR or registry://...},
        traffic: {VERSION: PERCENT}, rollout: {to: VERSION, ...}}` switches models, loads/unloads adapters (to
        exactly those listed), sets the split and starts a rollout, without dropping requests.

        A bad `traffic` or `rollout` is not applied and does not fail the replica (Serve would restart it, and every
        replica with it): the running split stays, and the controller records why (`moe-platform rollout status`,
        the audit log)."""
        config = user_config or {}
        unknown = sorted(set(config) - {"model", "adapters", "traffic", "rollout"})
        if unknown:
            raise ValueError(f"unknown user_config keys {unknown}; supported: ['adapters', 'model', 'rollout', "
                             f"'traffic']")
        model = config.get("model")
        if model:
            await asyncio.to_thread(self._swap_engine, model)
        if "adapters" in config:
            await asyncio.to_thread(self._sync_adapters, self._engine, _check_adapters(config["adapters"]))
        ask = rollout_controller.ask
        if "traffic" in config:
            try:
                split = self._check_split(config["traffic"])
            except ValueError as e:
                split = None
                await self._refuse(f"user_config.traffic is not applied: {e}")
            if split is not None and split != self._config_split:
                self._config_split = split
                try:  # the controller's split (of a rollout) gives way to a new one from the config, unless one runs
                    await ask(self._controller.set_traffic.remote(split.as_dict(), "serve deploy"))
                    self._split = split  # at a request boundary: each request reads the split once
                except RolloutError as e:
                    await self._refuse(f"user_config.traffic is not applied: {e}")
                except Exception as e:  # noqa: BLE001 - a controller that is away must not fail the replica
                    logger.warning("the rollout controller did not take the new split (%s); it applies here", e)
                    self._split = split
        section = config.get("rollout")
        try:
            section = read_probe_file(section, self._base_dir) if section is not None else None
        except RolloutError as e:
            return await self._refuse(f"user_config.rollout is not applied: {e}")
        # every replica hands the section over; the controller applies a given section once and records conflicts
        await self._tell(self._controller.declare.remote(section, "serve deploy"))

    async def _refuse(self, reason: str) -> None:
        logger.error("%s", reason)
        await self._tell(self._controller.refuse.remote(reason, "serve deploy"))

    @staticmethod
    async def _tell(ref) -> None:
        """A controller call from `reconfigure`, which must not fail the replica (Serve would restart it)."""
        try:
            await rollout_controller.ask(ref)
        except Exception as e:  # noqa: BLE001 - see the docstring
            logger.error("the rollout controller did not take the app's config: %s", e)

    def _sync_adapters(self, engine: Engine, declared: dict[str, str]) -> None:
        """Make `engine`'s adapters exactly `declared`: unload the others (their requests finish), load the new."""
        for name in {a["name"] for a in engine.loaded_adapters()} - set(declared):
            engine.unload_adapter(name)
        for name, source in declared.items():
            engine.load_adapter(name, source, self._base_dir)
        self._adapters = dict(declared)

    def _swap_engine(self, model: str) -> None:
        if registry.is_registry_uri(model):
            target = registry.resolve(model)  # "latest" means the latest now
            identity = target.uri
        else:
            target = identity = str((self._base_dir / Path(model).expanduser()).resolve())
        with self._swap_lock:
            if identity == _identity(self._engine.model_dir):
                return
            new = self._load(target)
            for name, source in self._adapters.items():  # the declared adapters move to the new base model
                try:
                    new.load_adapter(name, source, self._base_dir)
                except ValueError as e:
                    logger.warning("adapter %r does not load on the new model %s and is dropped: %s", name, model, e)
            new.start()
            old, self._engine = self._engine, new
        # The old engine finishes every request it accepted, then stops; its memory goes with it.
        threading.Thread(target=old.shutdown, kwargs={"drain": True, "timeout": 600}, daemon=True).start()

    def _engines(self) -> list[Engine]:
        return [self._engine, *self._others.values()]

    def check_health(self) -> None:
        for engine in self._engines():
            engine.check_health()

    def __del__(self):
        self._stop.set()
        for engine in self._engines():
            engine.shutdown(drain=False, timeout=5)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.frontend.completions(request)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.frontend.chat_completions(request)

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        return await self.frontend.models(request)

    @fastapi_app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request):
        return await self.frontend.load_adapter(request)

    @fastapi_app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request):
        return await self.frontend.unload_adapter(request)

    @fastapi_app.get("/admin/rollout")
    async def rollout_status(self, request: Request):
        return await self.frontend.rollout(request)

    @fastapi_app.post("/admin/rollout")
    async def rollout(self, request: Request):
        return await self.frontend.rollout(request)

    @fastapi_app.get("/metrics")
    async def metrics(self):
        """The whole app's serving metrics under vLLM's names (Prometheus text format), from the controller that
        every replica reports to; open like /health, as vLLM's is."""
        try:
            text = await rollout_controller.ask(self._controller.metrics_text.remote())
        except Exception as e:  # noqa: BLE001 - a scrape gets an answer, never a 500
            return error_response(EngineUnavailableError(f"the app's metrics are unavailable: {e}"))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @fastapi_app.get("/health")
    async def health(self):
        return await self.frontend.health()


def _ensure_arbiter() -> None:
    """Serving before training on this cluster (idempotent): never a reason for a deployment to fail."""
    from moe_platform.cluster.arbiter import ensure_arbiter

    try:
        ensure_arbiter()
    except Exception as e:
        logging.getLogger("moe_platform.serving").warning("could not start the serving arbiter: %s", e)


def _model_ref(model: str) -> str:
    """A model reference as every replica should load it: an export directory made absolute (and checked), or a
    registry URI with "latest" pinned to the version current now."""
    if registry.is_registry_uri(model):
        registry.parse_uri(model)
        # Pin "latest" so that every replica (also those autoscaling adds later) serves the same version. Builders
        # that run before connecting to Ray (`serve run IMPORT_PATH model=...`) leave that to the replicas.
        return registry.resolve(model).uri if ray.is_initialized() else model
    path = Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {path} has no config.json: pass the export directory written by "
                         f"`moe-platform export` (or training's <run>/export)")
    return str(path)


def build_app(args: dict | AppArgs) -> Application:
    """Serve application builder: `args` as in `AppArgs` (from a Serve config's `args:` or `run_server`)."""
    try:
        parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args))
    except ValidationError as e:
        raise ValueError(f"invalid moe-platform serve arguments: {e}") from None
    model = _model_ref(parsed.model)
    versions = {name: _model_ref(source) for name, source in parsed.versions.items()}
    if parsed.priority_over_training and ray.is_initialized():
        _ensure_arbiter()
    deployment = MoEServer.options(**parsed.deployment_options())
    if parsed.adapters and not parsed.engine.max_loras:
        raise ValueError(f"adapters {sorted(parsed.adapters)} need adapter slots: set engine.max_loras >= "
                         f"{len(parsed.adapters)}")
    return deployment.bind(model, parsed.engine_options(), parsed.model_name, parsed.api_key,
                           parsed.max_body_bytes, parsed.metrics_interval_s, os.getcwd(), parsed.adapters,
                           parsed.admin_api_key, parsed.version, versions, parsed.traffic,
                           str(Path(parsed.audit_log).expanduser().resolve()) if parsed.audit_log else None)


def start_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, name: str = "moe-platform",
                 **options) -> str:
    """Deploy the app on the running (or a new local) Ray cluster without blocking; return its base URL.
    `options` are `AppArgs` (engine options go in `engine={...}`). A registry://NAME[@VERSION] model needs the
    running cluster whose registry holds it."""
    if registry.is_registry_uri(str(model_dir)):
        registry.connect()
    app = build_app({"model": str(model_dir), **options})
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def run_server(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve `model_dir` on http://host:port/v1 until Ctrl-C (loopback by default), then shut Serve down."""
    url = start_server(model_dir, host=host, port=port, **options)
    print(f"moe-platform serving {model_dir} at {url}/v1 (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()

