"""`engine.core = "process"`: a served native engine steps in a child process of the replica, as vLLM's EngineCore
runs beside its API server.

Why: every torch call of a decode step lets go of Python's GIL and takes it back (some 500 to 1,300 calls a step).
In one process, the replica's HTTP, streaming and Ray Serve threads wait for the GIL behind the engine's loop and
the loop behind them; `bench/serve_path.py` measures what that costs. In a process of its own the engine keeps its
own GIL.

The replica keeps everything above the core: `ProcessEngine` is an `ElsewhereFront` with the model's tokenizer, chat
template and input checks (a bad request fails in the replica, before it is sent), and the child is our `Engine`
(`core = "thread"` there) on the same export. They talk over one pipe:
- replica -> child: ("add", request id, prompt ids, params, adapter), ("abort", id) and ("call", n, method, args)
  for adapters, the quality probe, statistics, health and shutdown;
- child -> replica: ("out", [RequestOutput]) once per engine step (the child's `StepSink`), ("reply", n, ok, value)
  and, at start, ("ready", None) or ("error", exception).
A reader thread in the replica hands each step's outputs to their streams (one wake-up per event loop per step).
The replica counts the requests it sent that have no output yet against `max_waiting` (429), and knows the adapters
it loaded (404), so those errors come at submit as in one process.

A registry version is written to a temporary export directory for the child to load (removed at shutdown); adapters
are read in the replica (registry ones need Ray) and sent to the child. In-place weight updates (RL weight sync)
run on an engine in the caller's process (`Engine`), as post_train/rollout.py builds it. If the child dies, every
request in flight gets an error (503) and the engine reports itself unhealthy, so Serve replaces the replica.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import pickle
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from moe_platform.serving.adapters import AdapterLoadError, LoadedAdapter, read_adapter_source
from moe_platform.serving.engine import ElsewhereFront, EngineConfig
from moe_platform.serving.errors import (
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
)
from moe_platform.serving.output_processor import deliver_outputs
from moe_platform.serving.outputs import RequestOutput, RequestStream, StepSink
from moe_platform.serving.sampling import SamplingParams

logger = logging.getLogger("moe_platform.serving.engine")
STARTUP_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 10.0  # the child answers between two torch calls of a step, so even a long step leaves time
# What the replica may ask of the child's engine by name (anything else is refused there).
_CALLS = ("load_read_adapter", "unload_adapter", "loaded_adapters", "score", "stats", "drain_latency_samples",
          "check_health", "shutdown")


def _dumps(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class ProcessEngine(ElsewhereFront):
    """Our engine in a child process, behind the engine's interface (`add_request`, `submit`, `abort`, adapters,
    `score`, `stats`, health, `shutdown`)."""

    def __init__(self, model_dir: str | Path, config: EngineConfig, source: str | None = None,
                 owned_dir: Path | None = None):
        self.config = config
        self.model_dir_on_disk = Path(model_dir)  # what the child loads
        self._owned_dir = owned_dir  # a registry version written out for the child: removed at shutdown
        self._init_front_from_dir(model_dir, config, source)
        self.failure: BaseException | None = None
        self.closed = False
        self._stopping = False  # shutdown asked: the child's exit is no failure
        self._lock = threading.Lock()  # the tables below, and one message on the pipe at a time
        self._sinks: dict[str, object] = {}  # request id -> its sink, until its last output
        self._unstarted: set[str] = set()  # sent, no output yet: counted against max_waiting
        self._adapters: set[str] = set()  # the adapters loaded in the child (requests for others: 404)
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._call_ids = itertools.count()
        ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no forked threads or Ray state
        self._conn, child_conn = ctx.Pipe()
        options = {**{k: getattr(config, k) for k in config.__dataclass_fields__}, "core": "thread"}
        self._proc = ctx.Process(target=_child_main, args=(child_conn, str(model_dir), options), daemon=True,
                                 name="moe-engine-core")
        self._proc.start()
        child_conn.close()
        try:
            self._wait_ready()
        except BaseException:
            self._stop_process(5.0)
            raise
        self._reader = threading.Thread(target=self._read, name="moe-engine-outputs", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> None:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._proc.is_alive() or waited >= STARTUP_TIMEOUT_S:
                raise RuntimeError(f"the engine process for {self.model_dir} did not start (exit code "
                                   f"{self._proc.exitcode}; the replica log says why)")
        kind, value = pickle.loads(self._conn.recv_bytes())
        if kind == "error":
            raise value

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options) -> ProcessEngine:
        """An export directory (config.json, model.safetensors, tokenizer files). Options: `EngineConfig`."""
        return cls(Path(model_dir), cls.config_of(options))

    @classmethod
    def config_of(cls, options: dict) -> EngineConfig:
        config = EngineConfig.from_options(**options)
        config.torch_device()  # a device that is not here fails in the replica, naming the option
        return config

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    sink: Callable[[RequestOutput], None] | RequestStream | None = None,
                    adapter: str | None = None) -> str:
        """Queue a request (thread-safe): checked here, stepped in the child; its outputs go to `sink` (a callable
        on the reader thread, a RequestStream on its event loop)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        ids = self.prepare_prompt(prompt)
        self.resolve_max_tokens(len(ids), params)
        with self._lock:
            self._check_open()
            request_id = request_id or f"{id(self):x}-{next(self._ids):x}"
            if request_id in self._sinks:
                raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
            if adapter is not None and adapter not in self._adapters:
                raise NotFoundError(f"no adapter named {adapter!r} is loaded; loaded: {sorted(self._adapters)}",
                                    param="model", code="model_not_found")
            if len(self._unstarted) >= self.config.max_waiting:
                raise EngineOverloadedError(f"the server is overloaded ({self.config.max_waiting} requests are "
                                            f"already waiting); retry later")
            self._sinks[request_id] = sink
            self._unstarted.add(request_id)
            self._send(("add", request_id, ids, params, adapter))
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it finishes with reason "abort" at the child's next step."""
        with self._lock:
            if request_id in self._sinks and not self.closed:
                self._send(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._sinks)

    def num_in_flight(self) -> int:
        return len(self._sinks)

    def step(self) -> list[RequestOutput]:
        raise RuntimeError("this engine steps in its own process; use submit, add_request or complete_batch")

    def _send(self, message: tuple) -> None:  # holds self._lock
        try:
            self._conn.send_bytes(_dumps(message))
        except (OSError, ValueError) as e:
            raise EngineUnavailableError(f"the engine process is gone ({e})") from None

    # -- the child's replies (reader thread) -------------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                message = pickle.loads(self._conn.recv_bytes())
                if message[0] == "out":
                    self._deliver(message[1])
                elif message[0] == "reply":
                    _, call_id, ok, value = message
                    with self._lock:
                        future = self._calls.pop(call_id, None)
                    if future is not None:
                        (future.set_result if ok else future.set_exception)(value)
        except (EOFError, OSError):
            pass
        except BaseException as e:  # noqa: BLE001 - reported as the engine's failure below
            logger.exception("reading the engine process's outputs failed")
            self.failure = e
        self._process_gone()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        deliveries = []
        with self._lock:
            for out in outs:
                self._unstarted.discard(out.request_id)
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    deliveries.append((sink, out))
        deliver_outputs(deliveries)

    def _process_gone(self) -> None:
        """The pipe closed: fail what is still waiting on the child (503), as a stopped engine does."""
        with self._lock:
            if not (self.closed or self._stopping) and self.failure is None:
                self.failure = RuntimeError(f"the engine process exited (code {self._proc.exitcode})")
            self.closed = True
            sinks, self._sinks = self._sinks, {}
            self._unstarted.clear()
            calls, self._calls = self._calls, {}
        message = "the engine stopped" if self.failure is None else f"the engine failed: {self.failure!r}"
        deliver_outputs([(sink, RequestOutput(rid, "", [], True, "error" if self.failure else "abort", 0, 0,
                                              error=message)) for rid, sink in sinks.items() if sink is not None])
        for future in calls.values():
            future.set_exception(EngineUnavailableError(message))

    def _call(self, method: str, *args, timeout: float | None = CALL_TIMEOUT_S):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.closed:
                raise EngineUnavailableError("the engine is shut down")
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            self._send(("call", call_id, method, args))
        return future.result(timeout)

    # -- LoRA adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str, base_dir: Path | None = None) -> LoadedAdapter:
        """Read the adapter at `source` here (a directory, or registry://NAME[@VERSION]) and load it as `name` in
        the child's free slot (running requests go on); the same source under the same name again is a no-op."""
        if not self.config.max_loras:
            raise AdapterLoadError("this engine holds no adapters: set the engine option max_loras >= 1",
                                   param="lora_name")
        adapter, where = read_adapter_source(source, base_dir, name)
        loaded = self._call("load_read_adapter", name, adapter, where)
        with self._lock:
            self._adapters.add(name)
        return loaded

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for adapter `name`; its slot frees once its running requests finish."""
        with self._lock:
            self._adapters.discard(name)
        self._call("unload_adapter", name)

    def loaded_adapters(self) -> list[dict]:
        return self._call("loaded_adapters")

    def update_weights(self, state: Mapping[str, torch.Tensor], keepalive: object = None) -> int:
        raise ValueError("update_weights: this engine steps in its own process (engine.core: process); in-place "
                         "weight sync (RL) runs on an engine in the caller's process (engine.core: thread)")

    # -- loop, health, shutdown ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self.closed and self._proc.is_alive()

    def check_health(self) -> None:
        """Raise if the engine cannot serve: the child exited, or its loop failed or stopped."""
        if self.failure is not None:
            raise RuntimeError(f"engine failed: {self.failure!r}")
        if self.closed:
            raise RuntimeError("engine is shut down")
        if not self._proc.is_alive():
            raise RuntimeError(f"the engine process exited (code {self._proc.exitcode})")
        try:
            self._call("check_health", timeout=HEALTH_TIMEOUT_S)
        except EngineUnavailableError as e:
            raise RuntimeError(str(e)) from None
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"the engine process did not answer a health check within {HEALTH_TIMEOUT_S:.0f} "
                               f"s") from None

    def shutdown(self, drain: bool = False, timeout: float | None = 60.0) -> None:
        """Stop the child's loop (with `drain`, after every request it accepted finishes) and the child; requests
        left get an error (503)."""
        if not self.closed:
            self._stopping = True
            try:
                self._call("shutdown", drain, timeout, timeout=None if timeout is None else timeout + 10.0)
            except (EngineUnavailableError, concurrent.futures.TimeoutError):
                pass
        with self._lock:
            self.closed = True
        self._stop_process(10.0)
        self._reader.join(10.0)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def _stop_process(self, timeout: float) -> None:
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)
        self._conn.close()

    # -- quality probe and statistics ----------------------------------------------------------------------------
    def score(self, texts: Sequence[str]) -> float:
        """Mean next-token loss (nats per token) of the model on `texts`, computed in the child between steps."""
        return self._call("score", list(texts), timeout=None)

    def stats(self) -> dict:
        """The child engine's numbers (`Engine.stats`)."""
        return self._call("stats")

    def drain_latency_samples(self) -> tuple[list[float], list[float]]:
        return self._call("drain_latency_samples")


def _child_main(conn, model_dir: str, options: dict) -> None:
    """The child: load the engine, run its loop, and serve the replica's messages until the pipe closes."""
    from moe_platform.serving.engine import Engine

    lock = threading.Lock()

    def send(message: tuple) -> None:
        data = _dumps(message)
        with lock:
            conn.send_bytes(data)

    try:
        engine = Engine.from_pretrained(model_dir, **options).start()
    except BaseException as e:  # noqa: BLE001 - the replica raises it (a bad export names what is wrong)
        send(("error", _picklable(e)))
        return
    sink = StepSink(lambda outputs: send(("out", outputs)))  # every request's: a step's outputs in one message
    send(("ready", None))
    try:
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == "add":
                _, request_id, ids, params, adapter = message
                try:
                    engine.add_request(ids, params, request_id, sink=sink, adapter=adapter)
                except Exception as e:  # noqa: BLE001 - that request's error, as its only output
                    send(("out", [RequestOutput(request_id, "", [], True, "error", len(ids), 0, error=str(e),
                                                request_failed=not isinstance(e, EngineUnavailableError))]))
            elif message[0] == "abort":
                engine.abort(message[1])
            else:
                _, call_id, method, args = message
                try:
                    if method not in _CALLS:
                        raise ValueError(f"unknown engine call {method!r}")
                    target = engine.lora.load_read if method == "load_read_adapter" else getattr(engine, method)
                    send(("reply", call_id, True, target(*args)))
                except Exception as e:  # noqa: BLE001 - raised in the replica
                    send(("reply", call_id, False, _picklable(e)))
                if method == "shutdown":
                    return
    except (EOFError, OSError):  # the replica went: stop with it
        engine.shutdown(drain=False, timeout=5.0)


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(_dumps((error,)))
    except Exception:  # noqa: BLE001 - an error that cannot cross the pipe goes as its message
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


__all__ = ["ProcessEngine"]
