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
- tokenizer routes: `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` in vLLM's shapes
  (moe_platform.serving.tokenizer_api), which lm-evaluation-harness uses to tokenize with the server's tokenizer;
- metrics: time to first token, inter-token latency, queue depth, batch size, tokens/s and per-expert load go to
  `ray.util.metrics` (Prometheus via Ray's metrics export).
"""


import asyncio
import dataclasses
import logging
import os
import re
import threading
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application

from moe_platform.cluster import registry
from moe_platform.serving import rollout_controller
from moe_platform.serving.engine import EngineConfig
from moe_platform.serving.errors import EngineUnavailableError
from moe_platform.serving.openai_api import (
    DEFAULT_MAX_BODY_BYTES,
    OpenAIFrontend,
    error_response,
    install_error_handlers,
)
from moe_platform.serving.replica_metrics import RayMetrics, RequestLog
from moe_platform.serving.rollout import RolloutError, read_probe_file
from moe_platform.serving.rollout_follower import RolloutFollower
from moe_platform.serving.tokenizer_api import TokenizerRoutes
from moe_platform.serving.traffic import PERCENT, TrafficSplit
from moe_platform.serving.versions import VersionSet

logger = logging.getLogger("ray.serve")
DEFAULT_MODEL_NAME = "moe-platform"

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


def _check_adapters(value) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                              for k, v in value.items()):
        raise ValueError(f"adapters must map adapter names to directories or registry:// references, got {value!r}")
    return value


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
        # Where build_app ran: relative user_config paths resolve against it. Other versions beside `model`
        # (`version`) each get their own engine; requests split by `traffic`.
        self.versions = VersionSet(model, engine_options, Path(base_dir), version, versions, traffic, adapters)
        requests = RequestLog()
        # Rollouts: the app's controller actor (moe_platform.serving.rollout_controller) owns the split while one
        # runs and after it ends; replicas sync with it every interval (the follower).
        context = serve.get_replica_context()
        app = context.app_name
        log = Path(audit_log or Path(base_dir) / "rollouts" / f"{app}.audit.jsonl")
        self._controller = rollout_controller.controller(app, model_name, str(log),
                                                         replica_ttl_s=max(10.0, 5 * metrics_interval_s))
        self.follower = RolloutFollower(self.versions, self._controller, context.replica_id.unique_id,
                                        RayMetrics(model_name), requests, metrics_interval_s).start()
        self.frontend = OpenAIFrontend(lambda: self.versions.engine, model_name, api_key, max_body_bytes,
                                       admin_api_key, pick=self.versions.pick, observe=requests.observe,
                                       rollout=self.follower.admin)
        self.tokenizer_routes = TokenizerRoutes(self.frontend)

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
            await asyncio.to_thread(self.versions.swap_engine, model)
        if "adapters" in config:
            await asyncio.to_thread(self.versions.sync_adapters, self.versions.engine,
                                    _check_adapters(config["adapters"]))
        ask = rollout_controller.ask
        if "traffic" in config:
            try:
                split = self.versions.check_split(config["traffic"])
            except ValueError as e:
                split = None
                await self._refuse(f"user_config.traffic is not applied: {e}")
            if split is not None and split != self.versions.config_split:
                self.versions.config_split = split
                try:  # the controller's split (of a rollout) gives way to a new one from the config, unless one runs
                    await ask(self._controller.set_traffic.remote(split.as_dict(), "serve deploy"))
                    self.versions.split = split  # at a request boundary: each request reads the split once
                except RolloutError as e:
                    await self._refuse(f"user_config.traffic is not applied: {e}")
                except Exception as e:  # noqa: BLE001 - a controller that is away must not fail the replica
                    logger.warning("the rollout controller did not take the new split (%s); it applies here", e)
                    self.versions.split = split
        section = config.get("rollout")
        try:
            section = read_probe_file(section, self.versions.base_dir) if section is not None else None
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

    def check_health(self) -> None:
        self.versions.check_health()

    def __del__(self):
        self.follower.stop()
        self.versions.shutdown()

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.frontend.completions(request)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.frontend.chat_completions(request)

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        return await self.frontend.models(request)

    @fastapi_app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self.tokenizer_routes.tokenize(request)

    @fastapi_app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self.tokenizer_routes.detokenize(request)

    @fastapi_app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        return await self.tokenizer_routes.tokenizer_info(request)

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

