"""The model versions one replica serves, with no Ray or Serve in it: an engine per version, the traffic split and
sticky sessions that pick a request's version, the declared LoRA adapters, a version loaded in the background, and
the hot swap of the main version's model. `MoEServer` (app.py) keeps only the routes around a `VersionSet`; the
`RolloutFollower` (rollout_follower.py) moves its split as the rollout controller says."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from moe_platform.cluster import registry
from moe_platform.serving.engine import Engine, SamplingParams
from moe_platform.serving.errors import NotFoundError
from moe_platform.serving.loader import load_engine
from moe_platform.serving.traffic import PERCENT, StickySessions, TrafficSplit

logger = logging.getLogger("ray.serve")  # the replica's log


def model_identity(model: str | None) -> str | None:
    """What a model reference names, for "is this the model already loaded?"."""
    return model if model is None or registry.is_registry_uri(model) else str(Path(model).resolve())


class VersionSet:
    def __init__(self, model: str, engine_options: dict, base_dir: Path, version: str = "stable",
                 versions: dict[str, str] | None = None, traffic: dict[str, int] | None = None,
                 adapters: dict[str, str] | None = None):
        self.engine_options = dict(engine_options)
        self.base_dir = base_dir  # where the app was built: relative paths resolve against it
        self.version = version  # the main version: the one `model` is, that swaps, and that holds the adapters
        self.engine = self.load(model)
        self.adapters: dict[str, str] = {}  # what the deployment declares (args, then user_config)
        self.sync_adapters(self.engine, adapters or {})
        self.engine.start()
        self._swap_lock = threading.Lock()
        self.others: dict[str, Engine] = {}  # the other versions, each its own engine
        self.sources: dict[str, str] = {version: str(model), **{k: str(v) for k, v in (versions or {}).items()}}
        for name, source in (versions or {}).items():  # as build_app resolved them
            self.others[name] = self.load(source).start()
        self.config_split = self.check_split(traffic or {version: PERCENT})  # what the app's config says
        self.split = self.config_split  # what requests follow now (a rollout's, while one runs)
        self.sessions = StickySessions()
        self.loading: dict[str, str] = {}  # versions loading in the background -> "" or their error

    def load(self, model: str | registry.ModelVersion) -> Engine:
        return load_engine(model, **self.engine_options)

    def check_split(self, traffic: dict[str, int]) -> TrafficSplit:
        return TrafficSplit.of(traffic, self.names())

    def names(self) -> list[str]:
        return [self.version, *self.others]

    def engines(self) -> dict[str, Engine]:
        return {self.version: self.engine, **self.others}

    def pick(self, pinned: str | None, session: str | None, adapter: str | None) -> tuple[Engine, str]:
        """The version of one request: the pinned one, else by session and traffic; adapter requests stay on the
        engine their adapters are loaded on (the main version's)."""
        if pinned is not None:
            version = pinned
        elif adapter is not None or not self.others:
            version = self.version
        else:
            version = self.sessions.route(self.split, session)
        if version == self.version:
            return self.engine, version
        engine = self.others.get(version)
        if engine is None:
            raise NotFoundError(f"the model version '{pinned}' does not exist; this server serves "
                                f"{sorted(self.names())}", param="model", code="model_not_found")
        return engine, version

    def report(self) -> dict[str, dict]:
        """Per version: whether it serves, its base model's fingerprint and its source (and a load's error)."""
        report = {name: {"ready": healthy(engine), "base": engine.base_fingerprint(), "source": self.sources.get(name)}
                  for name, engine in self.engines().items()}
        for name, error in list(self.loading.items()):
            report.setdefault(name, {"ready": False, "source": self.sources.get(name),
                                     **({"error": error} if error else {})})
        return report

    def start_loading(self, name: str, source: str) -> None:
        """Load version `name` from `source` on a background thread, unless it is there or on its way."""
        if name in self.engines() or name in self.loading:
            return
        self.loading[name] = ""
        self.sources[name] = source
        threading.Thread(target=self._load_version, args=(name, source), daemon=True, name=f"moe-load-{name}").start()

    def _load_version(self, name: str, source: str) -> None:
        try:
            target = source if registry.is_registry_uri(source) else str(self.base_dir / Path(source).expanduser())
            engine = self.load(target).start()
            engine.generate("\n", SamplingParams(max_tokens=1, temperature=0))  # health check: one real token
        except Exception as e:  # noqa: BLE001 - reported to the controller, which rolls back
            logger.exception("loading version %r from %s failed", name, source)
            # what the rollout status (an admin route) shows: no server path, no word on what exists there
            self.loading[name] = f"version {name!r} could not be loaded ({type(e).__name__}; the replica log says why)"
            return
        self.others = {**self.others, name: engine}  # a new dict: request threads iterate the old one
        del self.loading[name]

    def score(self, versions: list[str], prompts: list[str]) -> dict[str, float]:
        """Each named version's loss on `prompts` (a quality probe); inf for one that cannot score."""
        engines = self.engines()
        losses = {}
        for version in versions:
            if version in engines:
                try:
                    losses[version] = engines[version].score(prompts)
                except Exception as e:  # noqa: BLE001 - a version that cannot score fails the gate
                    logger.warning("quality probe of %r failed: %s", version, e)
                    losses[version] = float("inf")
        return losses

    def evaluate(self, job: dict) -> dict:
        """A rollout's eval gate on this replica: job["task"] (a YAML task under job["include_path"], relative to
        the app's directory) scored on each of job["versions"] -> {"scores", "metric", "higher_is_better",
        "documents"}, or {"error"} (what the rollout status shows: no server path)."""
        engines = self.engines()
        missing = sorted(set(job["versions"]) - set(engines))
        if missing:
            return {"error": f"versions {missing} are not served on this replica"}
        include = job.get("include_path")
        try:
            from moe_platform.serving.evaluation import evaluate_engines

            return evaluate_engines({v: engines[v] for v in job["versions"]}, job["task"],
                                    str(self.base_dir / Path(include).expanduser()) if include else None,
                                    job.get("limit"), job.get("metric"))
        except Exception as e:  # noqa: BLE001 - reported to the controller, which rolls back
            logger.exception("the eval gate's task %r failed", job.get("task"))
            return {"error": f"{type(e).__name__}; the replica log says why"}

    def sync_adapters(self, engine: Engine, declared: dict[str, str]) -> None:
        """Make `engine`'s adapters exactly `declared`: unload the others (their requests finish), load the new."""
        for name in {a["name"] for a in engine.loaded_adapters()} - set(declared):
            engine.unload_adapter(name)
        for name, source in declared.items():
            engine.load_adapter(name, source, self.base_dir)
        self.adapters = dict(declared)

    def swap_engine(self, model: str) -> None:
        """Serve the main version from `model` (a directory or registry://NAME[@VERSION]) without dropping a
        request: the new engine takes the declared adapters and new requests; the old one finishes its own."""
        if registry.is_registry_uri(model):
            target = registry.resolve(model)  # "latest" means the latest now
            identity = target.uri
        else:
            target = identity = str((self.base_dir / Path(model).expanduser()).resolve())
        with self._swap_lock:
            if identity == model_identity(self.engine.model_dir):
                return
            new = self.load(target)
            for name, source in self.adapters.items():  # the declared adapters move to the new base model
                try:
                    new.load_adapter(name, source, self.base_dir)
                except ValueError as e:
                    logger.warning("adapter %r does not load on the new model %s and is dropped: %s", name, model, e)
            new.start()
            old, self.engine = self.engine, new
        # The old engine finishes every request it accepted, then stops; its memory goes with it.
        threading.Thread(target=old.shutdown, kwargs={"drain": True, "timeout": 600}, daemon=True).start()

    def check_health(self) -> None:
        for engine in self.engines().values():
            engine.check_health()

    def shutdown(self) -> None:
        for engine in self.engines().values():
            engine.shutdown(drain=False, timeout=5)


def healthy(engine: Engine) -> bool:
    try:
        engine.check_health()
    except RuntimeError:
        return False
    return True
