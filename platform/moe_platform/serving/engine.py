"""The inference engine's front: requests in, a continuous-batching loop, outputs out (sync, callback or asyncio).

The engine is built in layers, as vLLM's V1 engine:
- `input_processor`: prompt text or ids, chat rendering, max_tokens -> a validated sequence;
- `lora_manager`: which LoRA adapter holds which slot, and its running requests;
- `engine_core`: the thread-safe inbox and `step()` = schedule -> execute -> update;
- `scheduler` (+ `kv_blocks`: the KV cache manager): admission, chunked prefill, KV blocks, prefix caching and
  preemption, with no tensor;
- `model_runner` (+ `cache`: the KV tensors): one forward of a prefill group or a decode batch on the device;
- `output_processor`: detokenizing, stops, log-probabilities, `RequestOutput`, latency samples;
- `engine_config`: `EngineConfig`, the options;
- this module: the wiring, the background loop and the async front (`submit`, `stream`), and `ElsewhereFront`,
  the front of a core that steps elsewhere (`engine_process`, `vllm_engine`).
No Ray or Serve here (the Serve deployment in `app.py` is a thin shell around this class), so all of it is
unit-tested on its own. One engine step:

1. take new requests and aborts from the thread-safe inbox;
2. admit waiting requests while KV blocks are free (each first takes its cached prefix) and run this step's prefill
   chunks (bucketed by length, under the per-step token budget); a sequence whose prompt completes samples its
   first token and joins the decode batch;
3. give every decoding sequence a block for its next token (preempting the newest when none is free), run one decode
   forward over them and sample one token each;
4. detokenize, apply stop strings / EOS / max_tokens, and retire finished sequences at once (their blocks are free
   for the next step, their full blocks stay in the prefix cache).

A request's parameters are validated when it is added, so a bad one fails there (400). What one request does alone
in a step (sampling its row, log-probabilities, detokenizing, stop strings, its sink) is isolated: an exception there
finishes that request with an error (500) and the step goes on for the others. Only what the whole batch shares
(a forward, the scheduler) stops the engine, which then fails every request (503) until the replica is replaced.

`step()` can be driven directly (tests, `generate` without a thread) or by the background loop started with
`start()`, which `stream()` (asyncio) and `generate()` use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import torch

from moe_platform.checkpoint.adapters import Adapters
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import MoETransformer
from moe_platform.serving.adapters import LoadedAdapter
from moe_platform.serving.chat import ChatTemplate
from moe_platform.serving.engine_config import AUTO_OUTPUTS_PER_STEP, DTYPES, EngineConfig
from moe_platform.serving.engine_core import EngineCore
from moe_platform.serving.errors import EngineOverloadedError, EngineUnavailableError
from moe_platform.serving.input_processor import InputProcessor
from moe_platform.serving.lora_manager import LoRAManager
from moe_platform.serving.model_loader import load_export, load_parts, write_export
from moe_platform.serving.model_runner import ModelRunner
from moe_platform.serving.outputs import RequestOutput, RequestStream
from moe_platform.serving.sampling import SamplingParams
from moe_platform.serving.scheduler import SequenceState as Seq
from moe_platform.serving.scheduler import build_scheduler

__all__ = ["ElsewhereFront", "Engine", "EngineConfig", "EngineFront", "RequestOutput", "RequestStream",
           "SamplingParams"]


class EngineFront:
    """What every engine backend shares above its core: prompts in (`inputs`, an `InputProcessor`), the asyncio and
    batch ways in, and the version fingerprint. A backend provides `config`, `add_request`, `abort`, `step`, `start`,
    `running` and `num_in_flight`, and calls `_init_front` (tokenizer, args, inputs)."""

    def _init_front(self, args: ModelArgs, tokenizer, eos_token_id: int | Sequence[int], config: EngineConfig,
                    chat_template: ChatTemplate | None, model_dir: str | None) -> None:
        """The state every backend keeps above its core: the model's args and tokenizer, its end-of-text ids
        (checked against the vocabulary; the first one also pads), the context window and the input processor."""
        self.args = args
        self.tokenizer = tokenizer
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not stops or not all(0 <= i < args.vocab_size for i in stops):
            raise ValueError(f"{model_dir or 'model'}: end-of-text ids {stops} must lie within the vocabulary "
                             f"(0..{args.vocab_size - 1}); check eos_token_id in generation_config.json")
        self.eos_token_id = stops[0]
        self.stop_token_ids = frozenset(stops)
        self.chat_template = chat_template or ChatTemplate()
        self.model_dir = model_dir  # where the model came from: an export directory or e.g. registry://NAME@VERSION
        self.keepalive: object = None  # whatever owns the memory the weights live in (see from_state_dict)
        self._fingerprint: dict | None = None
        self.max_seq_len = min(config.max_seq_len or args.max_seq_len, args.max_seq_len)
        self.inputs = InputProcessor(tokenizer, self.chat_template, args.vocab_size, self.max_seq_len,
                                     self.eos_token_id, config.seed)
        self.max_prompt_chars = self.inputs.max_prompt_chars

    def _init_front_from_dir(self, model_dir: str | Path, config: EngineConfig, source: str | None) -> None:
        """`_init_front` from an export directory's config, tokenizer and generation files, without its weights (a
        backend whose core loads them elsewhere)."""
        from moe_platform.checkpoint.hf import read_model_args
        from moe_platform.tokenizer import load_tokenizer, model_stop_ids

        tokenizer = load_tokenizer(model_dir)
        self._init_front(read_model_args(model_dir), tokenizer, model_stop_ids(tokenizer, model_dir), config,
                         ChatTemplate.from_dir(model_dir), source or str(model_dir))

    # -- requests ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.inputs.encode(text)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        return self.inputs.token_texts(ids)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.inputs.render_chat(messages)

    def prepare_prompt(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        return self.inputs.prepare_prompt(prompt, param)

    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams, param: str = "max_tokens") -> int:
        return self.inputs.resolve_max_tokens(prompt_len, params, param)

    def tokens_per_output(self) -> int:
        """How many new tokens a stream gathers per output after its first (`stream_interval`; 0: by the requests in
        flight, one per token up to AUTO_OUTPUTS_PER_STEP of them)."""
        return self.config.stream_interval or max(1, -(-self.num_in_flight() // AUTO_OUTPUTS_PER_STEP))

    # -- convenience APIs ----------------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None, adapter: str | None = None) -> RequestStream:
        """Queue a request from asyncio code (validation and overload errors raise here, not while iterating);
        async-iterate the returned handle for its outputs."""
        handle = RequestStream(self, asyncio.get_running_loop())
        self.start()
        handle.request_id = self.add_request(prompt, params, request_id, sink=handle, adapter=adapter)
        return handle

    async def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they come (consecutive ones merged). Cancelling aborts it."""
        handle = self.submit(prompt, params, request_id)
        try:
            async for out in handle:
                yield out
        finally:
            handle.abort()

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> str:
        """Generate one completion synchronously and return its text (without the prompt)."""
        return self.generate_batch([prompt], params)[0]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                       timeout: float | None = None, adapters: Sequence[str | None] | None = None) -> list[str]:
        """Generate completions for several prompts together (continuous batching), prompt i with adapter
        `adapters[i]` (None: the base model); return their texts in order."""
        return [out.text for out in self.complete_batch(prompts, params, timeout, adapters)]

    def complete_batch(self, prompts: Sequence[str | Sequence[int]],
                       params: SamplingParams | Sequence[SamplingParams] | None = None, timeout: float | None = None,
                       adapters: Sequence[str | None] | None = None,
                       max_in_flight: int | None = None) -> list[RequestOutput]:
        """Run several requests together (continuous batching), prompt i with `params[i]` (or one `params` for all)
        and adapter `adapters[i]` (None: the base model); return each one's whole output (text, tokens, log-
        probabilities) in order. With `max_in_flight`, at most that many are queued or running at once, and a full
        queue (other callers' requests) waits for room rather than failing: an evaluation beside live traffic;
        without it, a full queue raises EngineOverloadedError (the requests already queued are aborted)."""
        each = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        limit = max_in_flight or len(prompts) or 1
        results: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        outs: dict[str, RequestOutput] = {}
        ids: list[str] = []
        pending: set[str] = set()
        background = self.running
        try:
            while len(ids) < len(prompts) or pending:
                while len(ids) < len(prompts) and len(pending) < limit:
                    i = len(ids)
                    try:
                        rid = self.add_request(prompts[i], each[i], sink=results.put, adapter=adapters[i])
                    except EngineOverloadedError:
                        if max_in_flight is None:
                            raise
                        break  # room comes as requests finish (ours, or the other callers')
                    ids.append(rid)
                    pending.add(rid)
                if not background:
                    self.step()
                got = []
                if background:  # wait for the next output (or, with nothing of ours queued, for room)
                    try:
                        got.append(results.get(timeout=timeout if pending else 0.05))
                    except queue.Empty:
                        if pending:
                            raise TimeoutError(f"no output within {timeout} s") from None
                while not results.empty():
                    got.append(results.get_nowait())
                for out in got:
                    if out.error is not None:
                        raise out.failure()
                    outs[out.request_id] = outs[out.request_id].merge(out) if out.request_id in outs else out
                    if out.finished:
                        pending.discard(out.request_id)
        finally:
            for rid in pending:
                self.abort(rid)
        return [outs[rid] for rid in ids]

    def base_fingerprint(self) -> dict:
        """What must match between two versions that share traffic: the architecture and the tokenizer (hashed once
        per engine: replicas report it every metrics interval)."""
        if self._fingerprint is None:
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            self._fingerprint = {"architecture": self.args.hf_architecture, "vocab_size": self.args.vocab_size,
                                 "tokenizer": hashlib.blake2b(vocab.encode(), digest_size=8).hexdigest()}
        return dict(self._fingerprint)


class ElsewhereFront(EngineFront):
    """A backend whose core steps elsewhere (vLLM's async engine, our engine in a process of its own): it runs from
    the moment it is built, and keeps `closed` and `failure` (the exception that stopped its core, else None)."""

    closed: bool = False
    failure: BaseException | None = None
    model_dir_prefix = "moe-engine-model-"  # of the directory a registry version is written to for the core

    @classmethod
    def config_of(cls, options: dict) -> EngineConfig:
        return EngineConfig.from_options(**options)

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state: Mapping[str, torch.Tensor], files: Mapping[str, bytes | str],
                        source: str, keepalive: object = None, **options) -> ElsewhereFront:
        """A registry version (our state dict and the export's small files), written out as an export directory for
        the core to read; the backend removes the directory when it shuts down (`owned_dir`)."""
        config = cls.config_of(options)
        out = write_export(args, state, files, source, cls.model_dir_prefix)
        try:
            return cls(out, config, source=source, owned_dir=out)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise

    def start(self) -> ElsewhereFront:
        self._check_open()
        return self

    def _check_open(self) -> None:
        if self.closed or self.failure is not None:
            raise EngineUnavailableError("the engine is shut down" if self.failure is None else
                                         f"the engine failed: {self.failure!r}")


class Engine(EngineFront):
    """The engine's front (vLLM's LLMEngine/AsyncLLM): it wires an `InputProcessor`, a `LoRAManager` and an
    `EngineCore` (scheduler, model runner, output processor) together, runs the core's background loop, and gives
    the sync, callback and asyncio ways in."""

    def __init__(self, model: MoETransformer, tokenizer, eos_token_id: int | Sequence[int],
                 config: EngineConfig | None = None, chat_template: ChatTemplate | None = None,
                 model_dir: str | None = None):
        self.config = config or EngineConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model = model.eval()
        self._init_front(model.args, tokenizer, eos_token_id, self.config, chat_template, model_dir)
        step_lock = threading.Lock()
        self.lora = LoRAManager(model, self.config.max_loras, self.config.max_lora_rank, step_lock)
        self.adapters = self.lora.bank  # LoRA slots on the model (serving/adapters.py), None without max_loras
        self.runner = ModelRunner(model, self.eos_token_id, self.adapters)
        self.device = self.runner.device
        self.runner.cache, self.scheduler = build_scheduler(self.args, self.config, self.max_seq_len,
                                                            self.runner.dtype, self.device)
        self.cache = self.runner.cache
        self.core = EngineCore(self.runner, self.scheduler, self.stop_token_ids, self.max_seq_len,
                               self.config.max_waiting, on_finished=self._release_adapter, step_lock=step_lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = False

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options) -> Engine:
        """Load an export directory (config.json, model.safetensors, tokenizer files). Options: `EngineConfig`."""
        config = EngineConfig.from_options(**options)
        loaded = load_export(model_dir, config.torch_device(), DTYPES[config.dtype], config.quantization)
        return cls(loaded.model, loaded.tokenizer, loaded.eos_token_ids, config, loaded.chat_template, loaded.source)

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state: Mapping[str, torch.Tensor], files: Mapping[str, bytes | str],
                        source: str, keepalive: object = None, **options) -> Engine:
        """Build from in-memory parts (`model_loader.load_parts`: our state dict, used in place where it can be, and
        the export's small files by name). `keepalive` is held as long as the engine, e.g. the object-store
        reference the weights' views belong to. Options: `EngineConfig`."""
        config = EngineConfig.from_options(**options)
        loaded = load_parts(args, state, files, source, config.torch_device(), DTYPES[config.dtype],
                            config.quantization)
        engine = cls(loaded.model, loaded.tokenizer, loaded.eos_token_ids, config, loaded.chat_template, source)
        engine.keepalive = keepalive
        return engine

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    sink: Callable[[RequestOutput], None] | RequestStream | None = None,
                    adapter: str | None = None) -> str:
        """Queue a request (thread-safe), with the LoRA adapter named `adapter` or the base model (None). Its outputs
        are returned by step() and handed to `sink` at the end of each step: a callable is called on the engine
        thread, a RequestStream gets them on its event loop."""
        seq = self.inputs.make_sequence(prompt, params, request_id or self.core.new_request_id(), sink)
        if adapter is not None:
            seq.adapter_slot = self.lora.acquire(adapter)
            seq.adapter = adapter
        try:
            self.core.add(seq)
        except BaseException:
            self._release_adapter(seq)
            raise
        return seq.request_id

    def _release_adapter(self, seq: Seq) -> None:
        if seq.adapter is not None:
            name, seq.adapter = seq.adapter, None
            self.lora.release(name)

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it finishes with reason "abort" at the next step."""
        self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def num_in_flight(self) -> int:
        return self.core.num_active()

    # -- LoRA adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str, base_dir: Path | None = None) -> LoadedAdapter:
        """Load the LoRA adapter at `source` (a directory, or registry://NAME[@VERSION]) as `name` into a free slot
        (thread-safe; running requests go on). Loading the same source under the same name again is a no-op."""
        return self.lora.load(name, source, base_dir)

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for adapter `name`; its slot frees once its running requests finish."""
        self.lora.unload(name)

    def loaded_adapters(self) -> list[dict]:
        """The adapters requests can use now: name, source, rank and requests in flight."""
        return self.lora.loaded()

    def put_adapter(self, name: str, adapter: Adapters, source: str = "memory") -> LoadedAdapter:
        """Load an adapter held in memory as `name`, or write it over the adapter loaded under that name between two
        engine steps (a live swap: RL weight sync). The prefix cache is dropped: its KV came from the old weights."""
        loaded = self.lora.put(name, adapter, source)
        self._reset_prefix_cache()
        return loaded

    # -- new weights in place --------------------------------------------------------------------------------------
    def update_weights(self, state: Mapping[str, torch.Tensor], keepalive: object = None) -> int:
        """Swap new values in for the model's weights between two engine steps (RL weight sync); returns the bytes
        swapped in. `state` names tensors as `from_state_dict` takes them (a subset is fine); each becomes the
        parameter or buffer it names, used in place when it has the engine's dtype and device (read-only views into
        shared memory included, as `from_state_dict` uses them), else converted. `keepalive` replaces the engine's
        (e.g. the object-store buffer the views belong to). The prefix cache is dropped: its KV came from the old
        weights. Requests in flight go on with the new weights."""
        if self.config.quantization != "none":
            raise ValueError(f"update_weights: this engine serves {self.config.quantization} weights; new weights "
                             f"need an unquantized engine (quantization: none)")
        own = dict(self.model.named_parameters(remove_duplicate=False))
        own.update(self.model.named_buffers(remove_duplicate=False))
        unknown = sorted(n for n in state if n not in own or ".lora." in n)
        bad = sorted(n for n in state if n in own and tuple(state[n].shape) != tuple(own[n].shape))
        if unknown or bad:
            raise ValueError(f"update_weights: {self.model_dir or 'model'} has no tensors {unknown[:5]}, and "
                             f"{bad[:5]} have other shapes than the model's")
        placed = {n: t if (t.dtype, t.device) == (own[n].dtype, own[n].device) else t.to(own[n].device, own[n].dtype)
                  for n, t in state.items()}
        with self.core.step_lock:
            for name, t in placed.items():
                own[name].data = t
            self.keepalive = keepalive
        self._reset_prefix_cache()
        return sum(t.numel() * t.element_size() for t in placed.values())

    def _reset_prefix_cache(self) -> None:
        kv = getattr(self.scheduler, "kv", None)  # the paged scheduler's; the slot layout caches no prefix
        if kv is not None:
            with self.core.step_lock:
                kv.pool.reset_prefix_cache()

    def step(self) -> list[RequestOutput]:
        """Run one scheduling iteration (prefill chunks + one decode step); return the outputs it produced."""
        return self.core.step()

    # -- background loop -----------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the background loop thread (idempotent)."""
        core = self.core
        with core.lock:
            if core.closed or core.failure is not None:
                raise EngineUnavailableError("the engine is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="moe-engine", daemon=True)
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        core = self.core
        try:
            while True:
                with core.cv:
                    while not (self._stopping or core.inbox or self.scheduler.has_work()):
                        core.cv.wait()
                    if self._stopping and (not self._drain or not (core.inbox or self.scheduler.has_work())):
                        core.closed = True
                        break
                    if not self.scheduler.has_work() and self.config.batch_wait_timeout_s > 0:
                        # Idle engine: give a burst of arrivals a moment to share the first prefill.
                        deadline = time.monotonic() + self.config.batch_wait_timeout_s
                        while core.inbox_adds < self.config.max_batch_size and not self._stopping:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            core.cv.wait(remaining)
                core.step()
        except BaseException as e:  # noqa: BLE001 - any failure must reach the waiting requests
            core.failure = e
            with core.lock:
                core.closed = True
        core.fail_all("the engine stopped" if core.failure is None else f"the engine failed: {core.failure!r}")

    def shutdown(self, drain: bool = False, timeout: float | None = 60.0) -> None:
        """Stop the loop; with `drain`, first finish every request already accepted (new ones are still accepted
        until the loop runs dry)."""
        core = self.core
        with core.cv:
            self._stopping = True
            self._drain = drain
            core.cv.notify_all()
            thread = self._thread
            if thread is None:
                core.closed = True
        if thread is not None:
            thread.join(timeout)
        else:
            core.fail_all("the engine stopped")

    def check_health(self) -> None:
        """Raise if the engine cannot serve (its loop failed or stopped)."""
        if self.core.failure is not None:
            raise RuntimeError(f"engine loop failed: {self.core.failure!r}")
        if self.core.closed:
            raise RuntimeError("engine is shut down")
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("engine loop thread died")

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> float:
        """Mean next-token loss (nats per token) of the model on `texts` (each cut to the context window), computed
        between engine steps: a quality probe of a model version."""
        total, count = 0.0, 0
        for text in texts:
            ids = self.encode(text)[: self.max_seq_len]
            if len(ids) < 2:
                continue
            with self.core.step_lock:
                loss = self.runner.loss(ids)
            total, count = total + loss, count + len(ids) - 1
        if not count:
            raise ValueError("the probe texts hold no two tokens to score")
        return total / count

    # -- statistics ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plain numbers about the engine's state and work so far (read from any thread)."""
        return self.core.stats()

    def drain_latency_samples(self) -> tuple[list[float], list[float]]:
        """Time-to-first-token and inter-token latency samples (seconds) recorded since the previous call."""
        return self.core.outputs.drain_latency_samples()
