"""The inference engine's front: requests in, a continuous-batching loop, outputs out (sync, callback or asyncio).

The engine is built in layers, as vLLM's: `model_loader` (weights, tokenizer and chat template onto the device),
`model_runner` (one forward of a prefill group or a decode batch on the device; logits back on the CPU),
`scheduler` + `kv_blocks` + `cache` (the step plan: admission, chunked prefill, KV blocks, prefix caching,
preemption) and this module (validation, the thread-safe inbox, sampling, stops, adapters, statistics). No Ray or
Serve here (the Serve deployment in `app.py` is a thin shell around this class), so all of it is unit-tested on its
own. One engine step:

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
import dataclasses
import hashlib
import itertools
import json
import logging
import queue
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_platform.checks import requirer
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import MoETransformer
from moe_platform.serving.adapters import AdapterBank, AdapterLoadError, LoadedAdapter, read_adapter_source
from moe_platform.serving.cache import KV_CACHE_DTYPES
from moe_platform.serving.chat import ChatTemplate
from moe_platform.serving.detokenizer import IncrementalDetokenizer, StopStringMatcher, max_prompt_chars
from moe_platform.serving.errors import (
    ContextLengthError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
)
from moe_platform.serving.model_loader import load_export, load_parts
from moe_platform.serving.model_runner import ModelRunner
from moe_platform.serving.outputs import RequestOutput, RequestStream
from moe_platform.serving.quant import QUANTIZATIONS
from moe_platform.serving.sampling import SamplingParams, draw_uniforms, make_generator, sample_tokens, token_logprobs
from moe_platform.serving.scheduler import PrefillGroup, SeqStatus, build_scheduler
from moe_platform.serving.scheduler import SequenceState as Seq

__all__ = ["Engine", "EngineConfig", "RequestOutput", "RequestStream", "SamplingParams"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_THROUGHPUT_WINDOW_S = 10.0
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_LATENCY_SAMPLES = 65536
logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = field(default=64, metadata={"doc": "sequences running at once at most (decoded together)"})
    batch_wait_timeout_s: float = field(
        default=0.05, metadata={"doc": "an idle engine waits this long for more requests before its first prefill"})
    prefill_token_budget: int = field(
        default=512, metadata={"doc": "prompt tokens prefilled per step at most (long prompts are chunked)"})
    max_waiting: int = field(default=256, metadata={"doc": "queued (not yet admitted) requests before rejecting"})
    max_seq_len: int = field(default=0, metadata={"doc": "context window; 0 takes the model's max_seq_len"})
    kv_cache_layout: str = field(default="paged", metadata={"doc": "paged (KV blocks on demand, prefix caching, "
                                                                   "preemption) or slots (one max_seq_len slot per "
                                                                   "running sequence)"})
    block_size: int = field(default=16, metadata={"doc": "token positions per KV block (paged)"})
    kv_cache_memory_bytes: int = field(default=0, metadata={"doc": "KV cache size; 0: kv_cache_memory_fraction of free "
                                                                   "memory on CUDA, max_batch_size x max_seq_len "
                                                                   "tokens on the CPU"})
    kv_cache_memory_fraction: float = field(default=0.9, metadata={"doc": "of the device memory free after loading "
                                                                          "the weights (CUDA, kv_cache_memory_bytes "
                                                                          "0)"})
    enable_prefix_caching: bool = field(default=True, metadata={"doc": "share the KV blocks of common prompt "
                                                                       "prefixes between requests (paged)"})
    kv_cache_dtype: str = field(default="auto", metadata={"doc": "auto (the model's dtype), int8 (per-token scales) "
                                                                 "or fp8 (CUDA only); paged"})
    device: str = field(default="auto", metadata={"doc": "auto (cuda when one is visible), cpu, cuda or cuda:N"})
    dtype: str = field(default="float32", metadata={"doc": "weights, activations and KV cache: float32, bfloat16 "
                                                           "or float16 (float16 on CUDA only)"})
    quantization: str = field(default="none", metadata={"doc": "none, int8 or int4 (weight-only: attention, shared "
                                                                 "and routed experts; serving/quant.py)"})
    num_threads: int = field(default=0, metadata={"doc": "torch intra-op threads; 0 keeps torch's setting"})
    seed: int = field(default=0, metadata={"doc": "seeds the per-request seeds of requests that bring none"})
    max_loras: int = field(default=0, metadata={"doc": "LoRA adapters held at once (0: none; see load_adapter)"})
    max_lora_rank: int = field(default=16, metadata={"doc": "the largest adapter rank max_loras slots can hold"})

    def __post_init__(self) -> None:
        need = requirer("engine option")

        for name in ("max_batch_size", "prefill_token_budget", "max_waiting", "max_lora_rank", "block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        need(isinstance(self.batch_wait_timeout_s, (int, float)) and 0 <= self.batch_wait_timeout_s <= 10,
             f"batch_wait_timeout_s must be in [0, 10] seconds, got {self.batch_wait_timeout_s!r}")
        need(isinstance(self.max_seq_len, int) and self.max_seq_len >= 0,
             f"max_seq_len must be an integer >= 0, got {self.max_seq_len!r}")
        need(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        need(self.kv_cache_layout in ("paged", "slots"), f"kv_cache_layout must be paged or slots, got "
                                                          f"{self.kv_cache_layout!r}")
        need(isinstance(self.kv_cache_memory_bytes, int) and not isinstance(self.kv_cache_memory_bytes, bool)
             and self.kv_cache_memory_bytes >= 0,
             f"kv_cache_memory_bytes must be an integer >= 0, got {self.kv_cache_memory_bytes!r}")
        need(isinstance(self.kv_cache_memory_fraction, (int, float)) and 0 < self.kv_cache_memory_fraction <= 1,
             f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction!r}")
        need(isinstance(self.enable_prefix_caching, bool),
             f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        need(self.kv_cache_dtype in KV_CACHE_DTYPES, f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got "
                                                     f"{self.kv_cache_dtype!r}")
        need(self.kv_cache_layout == "paged" or self.kv_cache_dtype == "auto",
             "kv_cache_dtype int8 and fp8 need kv_cache_layout paged")
        need(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.quantization in QUANTIZATIONS, f"quantization must be one of {list(QUANTIZATIONS)}, got "
                                                 f"{self.quantization!r}")
        need(self.quantization == "none" or not self.max_loras, "quantization and LoRA adapters (max_loras) do not "
                                                                "go together yet; serve adapters unquantized")
        need(isinstance(self.max_loras, int) and not isinstance(self.max_loras, bool) and self.max_loras >= 0,
             f"max_loras must be an integer >= 0, got {self.max_loras!r}")
        need(isinstance(self.num_threads, int) and self.num_threads >= 0,
             f"num_threads must be an integer >= 0, got {self.num_threads!r}")

    def torch_device(self) -> torch.device:
        """The device the engine runs on (`auto`: the first visible CUDA device, else the CPU); a CUDA device that
        is not there, float16 on the CPU or LoRA adapters on CUDA are errors naming the option."""
        need = requirer("engine option")
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available() else
                              "cpu" if self.device == "auto" else self.device)
        if device.type == "cuda":
            need(torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                 f"device {self.device!r}: no such CUDA device here ({torch.cuda.device_count()} visible); give the "
                 f"replica a GPU (num_gpus) or use device: cpu")
            need(not self.max_loras, "LoRA adapters (max_loras) are served on the CPU only for now; use device: cpu")
        need(device.type == "cuda" or self.dtype != "float16", "dtype float16 needs device cuda; on the CPU use "
                                                               "float32 or bfloat16")
        need(device.type == "cuda" or self.kv_cache_dtype != "fp8", "kv_cache_dtype fp8 needs device cuda; on the "
                                                                    "CPU use auto or int8")
        return device

    @classmethod
    def from_options(cls, **options) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine options {unknown}; known: {sorted(known)}")
        return cls(**options)


class Engine:
    def __init__(self, model: MoETransformer, tokenizer, eos_token_id: int | Sequence[int],
                 config: EngineConfig | None = None, chat_template: ChatTemplate | None = None,
                 model_dir: str | None = None):
        self.config = config or EngineConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model = model.eval()
        self.args = model.args
        self.tokenizer = tokenizer
        # Generation stops at any end-of-text id; the first one also pads.
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not stops or not all(0 <= i < self.args.vocab_size for i in stops):
            raise ValueError(f"{model_dir or 'model'}: end-of-text ids {stops} must lie within the vocabulary "
                             f"(0..{self.args.vocab_size - 1}); check eos_token_id in generation_config.json")
        self.eos_token_id = stops[0]
        self.stop_token_ids = frozenset(stops)
        self.chat_template = chat_template or ChatTemplate()
        self.model_dir = model_dir  # where the model came from: an export directory or e.g. registry://NAME@VERSION
        self.keepalive: object = None  # whatever owns the memory the weights live in (see from_state_dict)
        self._fingerprint: dict | None = None
        self.max_seq_len = min(self.config.max_seq_len or self.args.max_seq_len, self.args.max_seq_len)
        # Text longer than this cannot fit the context: refused before it is tokenized (detokenizer.py).
        self.max_prompt_chars = max_prompt_chars(tokenizer, self.max_seq_len)
        # LoRA adapters (serving/adapters.py): slots on the model, written between steps (under _step_lock).
        self.adapters = AdapterBank(model, self.config.max_loras, self.config.max_lora_rank) \
            if self.config.max_loras else None
        self.runner = ModelRunner(model, self.eos_token_id, self.adapters)
        self.device = self.runner.device
        self.runner.cache, self.scheduler = build_scheduler(self.args, self.config, self.max_seq_len,
                                                            self.runner.dtype, self.device)
        self.cache = self.runner.cache
        self._rng = random.Random(self.config.seed)
        self._loaded: dict[str, LoadedAdapter] = {}
        self._step_lock = threading.Lock()
        # Thread-safe inbox: ("add", Seq) / ("abort", request_id); drained by the thread that runs step().
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._inbox: deque[tuple[str, object]] = deque()
        self._inbox_adds = 0
        self._active_ids: set[str] = set()
        self._id_prefix = f"{uuid.uuid4().hex[:12]}-"  # request ids: prefix + counter (no os.urandom per request)
        self._id_counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = False
        self._closed = False
        self._failure: BaseException | None = None
        # Plain statistics (the Serve deployment turns them into Ray metrics).
        self._ttft: deque[float] = deque(maxlen=_MAX_LATENCY_SAMPLES)
        self._itl: deque[float] = deque(maxlen=_MAX_LATENCY_SAMPLES)
        self._recent: deque[tuple[float, int]] = deque()  # (step end time, tokens generated in the step)
        self._recent_total = 0
        self._tokens_per_s = 0.0
        self._last_step_time = 0.0
        self._counters = {"requests_finished": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0}
        self._last_decode_batch = 0
        self._deliveries: list[tuple[object, RequestOutput]] = []  # (sink, output) of the current step

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options) -> Engine:
        """Load an export directory (config.json, model.safetensors, tokenizer files). Options: `EngineConfig`."""
        config = EngineConfig.from_options(**options)
        loaded = load_export(model_dir, config.torch_device(), _DTYPES[config.dtype], config.quantization)
        return cls(loaded.model, loaded.tokenizer, loaded.eos_token_ids, config, loaded.chat_template, loaded.source)

    @classmethod
    def from_state_dict(cls, args: ModelArgs, state: Mapping[str, torch.Tensor], files: Mapping[str, bytes | str],
                        source: str, keepalive: object = None, **options) -> Engine:
        """Build from in-memory parts (`model_loader.load_parts`: our state dict, used in place where it can be, and
        the export's small files by name). `keepalive` is held as long as the engine, e.g. the object-store
        reference the weights' views belong to. Options: `EngineConfig`."""
        config = EngineConfig.from_options(**options)
        loaded = load_parts(args, state, files, source, config.torch_device(), _DTYPES[config.dtype],
                            config.quantization)
        engine = cls(loaded.model, loaded.tokenizer, loaded.eos_token_ids, config, loaded.chat_template, source)
        engine.keepalive = keepalive
        return engine

    # -- requests ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (a token holding part of a character shows as U+FFFD, as in vLLM)."""
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.chat_template.render(messages, add_generation_prompt=True)

    def prepare_prompt(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        """Prompt text or token ids -> validated token ids (an empty prompt starts from the end-of-text token)."""
        if isinstance(prompt, str):
            if len(prompt) > self.max_prompt_chars:
                raise ContextLengthError(f"the prompt is {len(prompt)} characters, more than this model's context "
                                         f"window of {self.max_seq_len} tokens can hold (at most "
                                         f"{self.max_prompt_chars} characters); shorten the prompt", param=param)
            ids = self.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.args.vocab_size
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token ids must be integers in [0, {vocab}), got {bad[:5]}", param=param)
        if not ids:
            ids = [self.eos_token_id]
        if len(ids) >= self.max_seq_len:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens but this model's context window is "
                                     f"{self.max_seq_len} tokens, which must also hold at least one generated "
                                     f"token; shorten the prompt", param=param)
        return ids

    def resolve_max_tokens(self, prompt_len: int, params: SamplingParams, param: str = "max_tokens") -> int:
        room = self.max_seq_len - prompt_len
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ContextLengthError(f"this model's context window is {self.max_seq_len} tokens, but the prompt "
                                     f"({prompt_len} tokens) plus max_tokens ({params.max_tokens}) needs "
                                     f"{prompt_len + params.max_tokens}; lower {param} to at most {room}",
                                     param=param)
        return params.max_tokens

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    sink: Callable[[RequestOutput], None] | RequestStream | None = None,
                    adapter: str | None = None) -> str:
        """Queue a request (thread-safe), with the LoRA adapter named `adapter` or the base model (None). Its outputs
        are returned by step() and handed to `sink` at the end of each step: a callable is called on the engine
        thread, a RequestStream gets them on its event loop."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.validate()  # again: a caller may have changed them since they were made
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        ids = self.prepare_prompt(prompt)
        max_tokens = self.resolve_max_tokens(len(ids), params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        request_id = request_id or f"{self._id_prefix}{next(self._id_counter):x}"
        seq = Seq(request_id, ids, params, max_tokens, time.monotonic(), sink=sink,
                  generator=None if params.greedy else make_generator(seed))
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.stopper = StopStringMatcher(params.stop)
        with self._cv:
            if self._closed or self._failure is not None:
                raise EngineUnavailableError("the engine is shut down; retry on another replica")
            if request_id in self._active_ids:
                raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
            if self._inbox_adds + len(self.scheduler.waiting) >= self.config.max_waiting:
                raise EngineOverloadedError(f"the server is overloaded ({self.config.max_waiting} requests are "
                                            f"already waiting); retry later")
            if adapter is not None:
                loaded = self._loaded.get(adapter)
                if loaded is None or loaded.unloading:
                    raise NotFoundError(f"no adapter named {adapter!r} is loaded; loaded: "
                                        f"{sorted(n for n, a in self._loaded.items() if not a.unloading)}",
                                        param="model", code="model_not_found")
                loaded.running += 1
                seq.adapter, seq.adapter_slot = adapter, loaded.slot
            self._active_ids.add(request_id)
            self._inbox.append(("add", seq))
            self._inbox_adds += 1
            self._cv.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it finishes with reason "abort" at the next step."""
        with self._cv:
            if request_id in self._active_ids:
                self._inbox.append(("abort", request_id))
                self._cv.notify()

    def has_unfinished(self) -> bool:
        return bool(self._active_ids)

    # -- LoRA adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str, base_dir: Path | None = None) -> LoadedAdapter:
        """Load the LoRA adapter at `source` (a directory, or registry://NAME[@VERSION]) as `name` into a free slot
        (thread-safe; running requests go on). Loading the same source under the same name again is a no-op."""
        if self.adapters is None:
            raise AdapterLoadError("this engine holds no adapters: set the engine option max_loras >= 1",
                                   param="lora_name")
        if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
            raise AdapterLoadError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-'",
                                   param="lora_name")
        adapter, where = read_adapter_source(source, base_dir, name)
        with self._lock:
            known = self._loaded.get(name)
        if known is not None and known.source == where and not known.unloading:
            return known
        modules = self.adapters.check(adapter, name, where)
        with self._lock:
            known = self._loaded.get(name)
            if known is not None:
                if known.source == where and not known.unloading:
                    return known
                raise AdapterLoadError(f"an adapter named {name!r} is already loaded from another source; unload "
                                       f"it first", param="lora_name", code="adapter_exists")
            slot = self.adapters.free_slot()
            if slot is None:
                raise AdapterLoadError(f"all {self.config.max_loras} adapter slots are in use "
                                       f"({', '.join(sorted(self._loaded))}); unload one first or raise max_loras",
                                       param="lora_name", code="adapter_slots_full")
            self.adapters.slots[slot] = name  # reserved; requests see the adapter only once it is written
        try:
            with self._step_lock:
                self.adapters.write(slot, adapter)
        except BaseException:
            with self._lock:
                self.adapters.slots[slot] = None
            raise
        loaded = LoadedAdapter(name, where, slot, adapter.rank, targets=modules)
        with self._lock:
            self._loaded[name] = loaded
        return loaded

    def unload_adapter(self, name: str) -> None:
        """Stop accepting requests for adapter `name`; its slot frees once its running requests finish."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None or loaded.unloading:
                raise NotFoundError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._loaded)}",
                                    param="lora_name", code="model_not_found")
            loaded.unloading = True
            if loaded.running == 0:
                self._release(loaded)

    def _release(self, loaded: LoadedAdapter) -> None:  # holds self._lock
        del self._loaded[loaded.name]
        self.adapters.slots[loaded.slot] = None  # the next load overwrites every module's pair in it

    def loaded_adapters(self) -> list[dict]:
        """The adapters requests can use now: name, source, rank and requests in flight."""
        with self._lock:
            return [{"name": a.name, "source": a.source, "rank": a.rank, "running": a.running}
                    for a in sorted(self._loaded.values(), key=lambda a: a.name) if not a.unloading]

    # -- one iteration -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling iteration (prefill chunks + one decode step); return the outputs it produced."""
        with self._step_lock:
            return self._step()

    def _step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        self._drain_inbox(outputs)
        for group in self.scheduler.schedule_prefill():
            self._run_prefill(group, outputs)
        batch = self.scheduler.decode_batch()
        self._last_decode_batch = len(batch)
        if batch:
            self._run_decode(batch, outputs)
        self._counters["steps"] += 1
        self._update_throughput(sum(len(o.token_ids) for o in outputs))
        self._deliver()
        return outputs

    def _deliver(self) -> None:
        """Hand this step's outputs to their sinks: one wake-up per event loop per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for sink, out in self._deliveries:
            if isinstance(sink, RequestStream):
                by_loop.setdefault(sink._loop, []).append((sink, out))
            else:
                try:
                    sink(out)
                except Exception:  # noqa: BLE001 - a caller's callback fails its own request's delivery only
                    logger.exception("the output sink of request %s failed", out.request_id)
        self._deliveries.clear()
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(RequestStream.deliver, items)

    def _update_throughput(self, produced: int) -> None:
        now = time.monotonic()
        self._recent.append((now, produced))
        self._recent_total += produced
        while now - self._recent[0][0] > _THROUGHPUT_WINDOW_S:
            self._recent_total -= self._recent.popleft()[1]
        span = now - self._recent[0][0]
        self._tokens_per_s = self._recent_total / span if span > 0.5 else 0.0
        self._last_step_time = now

    def _drain_inbox(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            self._inbox_adds = 0
        for kind, item in items:
            if kind == "add":
                self.scheduler.add(item)  # type: ignore[arg-type]
            else:
                seq = self.scheduler.find(item)  # type: ignore[arg-type]
                if seq is not None:
                    self.scheduler.finish(seq, "abort")
                    self._emit(seq, outputs)

    def _run_prefill(self, group: PrefillGroup, outputs: list[RequestOutput]) -> None:
        chunks = group.chunks
        logits = self.runner.prefill(group, self.scheduler)  # (rows, vocab) on the CPU, sampled here
        for c in chunks:
            self.scheduler.advance(c.seq, c.length)
        done = [i for i, c in enumerate(chunks) if c.completes_prompt]
        if not done:
            return
        now = time.monotonic()
        for seq, token, lp in self._sample(logits[done], [chunks[i].seq for i in done], outputs):
            if not seq.output_ids:  # not a preempted sequence's recomputation
                self._counters["prompt_tokens"] += seq.prompt_len
            if self._append_token(seq, token, now, outputs, lp) is False:
                self.scheduler.prefill_done(seq)

    def _run_decode(self, batch: list[Seq], outputs: list[RequestOutput]) -> None:
        logits = self.runner.decode(batch, self.scheduler)  # (D, vocab) on the CPU
        for seq in batch:
            self.scheduler.advance(seq, 1)
        now = time.monotonic()
        for seq, token, lp in self._sample(logits, batch, outputs):
            self._append_token(seq, token, now, outputs, lp)

    def _sample(self, logits: torch.Tensor, seqs: list[Seq], outputs: list[RequestOutput]) -> list[tuple]:
        """(seq, next token, its log-probabilities) of every row of logits (rows, V); when the batch fails, row by
        row with the same draws, and a row that fails alone fails its request alone."""
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        u = draw_uniforms(params, gens)  # (rows,) each row's one draw of this step, whatever happens below
        try:
            ids = sample_tokens(logits, params, gens, u).tolist()
            return list(zip(seqs, ids, token_logprobs(logits, ids, [p.logprobs for p in params]), strict=True))
        except Exception:  # noqa: BLE001 - the rows at fault are found below
            pass
        kept = []
        for i, seq in enumerate(seqs):
            try:
                ids = sample_tokens(logits[i:i + 1], params[i:i + 1], gens[i:i + 1], u[i:i + 1]).tolist()
                kept.append((seq, ids[0], token_logprobs(logits[i:i + 1], ids, [params[i].logprobs])[0]))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self._fail_request(seq, outputs, e)
        return kept

    def _fail_request(self, seq: Seq, outputs: list[RequestOutput], error: Exception) -> None:
        """Finish `seq` with an error (its client gets 500) and log why; the step goes on for the others."""
        logger.error("request %s failed in the engine step and is finished with an error (the others go on)",
                     seq.request_id, exc_info=error)
        self.scheduler.finish(seq, "error")
        self._emit(seq, outputs, error=f"the server failed while generating this request "
                                       f"({type(error).__name__}); retry it", request_failed=True)

    def _append_token(self, seq: Seq, token: int, now: float, outputs: list[RequestOutput],
                      logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool | None:
        """Record one generated token; return True if it finished the sequence, None if it failed it (alone)."""
        try:
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
                self._ttft.append(now - seq.arrival_time)
            else:
                self._itl.append(now - seq.last_token_time)
            seq.last_token_time = now
            self._counters["generated_tokens"] += 1
            reason = None
            if token in self.stop_token_ids and not seq.params.ignore_eos:
                reason = "stop"
            elif seq.stopper.append(seq.detokenizer.add(token)):
                reason = "stop"
            if reason is None and (len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_seq_len):
                reason = "length"
            if reason is not None and not seq.stopper.stopped and seq.stopper.append(seq.detokenizer.flush()):
                reason = "stop"
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._counters["requests_finished"] += 1
            self._emit(seq, outputs, [token], logprobs=None if logprob is None else [logprob])
        except Exception as e:  # noqa: BLE001 - detokenizing and stop strings are this request's own
            self._fail_request(seq, outputs, e)
            return None
        return reason is not None

    def _emit(self, seq: Seq, outputs: list[RequestOutput], new_ids: list[int] | None = None,
              error: str | None = None, logprobs: list | None = None, request_failed: bool = False) -> None:
        finished = seq.status is SeqStatus.FINISHED
        text = seq.stopper.take(finished) if error is None else ""
        out = RequestOutput(seq.request_id, text, new_ids or [], finished, seq.finish_reason, seq.prompt_len,
                            len(seq.output_ids), error, request_failed, logprobs)
        if finished:
            with self._lock:
                self._active_ids.discard(seq.request_id)
                loaded = self._loaded.get(seq.adapter) if seq.adapter is not None else None
                if loaded is not None:
                    seq.adapter = None
                    loaded.running -= 1
                    if loaded.unloading and loaded.running == 0:
                        self._release(loaded)
        outputs.append(out)
        if seq.sink is not None:
            self._deliveries.append((seq.sink, out))

    # -- background loop -----------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the background loop thread (idempotent)."""
        with self._lock:
            if self._closed or self._failure is not None:
                raise EngineUnavailableError("the engine is shut down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="moe-engine", daemon=True)
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self.scheduler.has_work()):
                        self._cv.wait()
                    if self._stopping and (not self._drain or not (self._inbox or self.scheduler.has_work())):
                        self._closed = True
                        break
                    if not self.scheduler.has_work() and self.config.batch_wait_timeout_s > 0:
                        # Idle engine: give a burst of arrivals a moment to share the first prefill.
                        deadline = time.monotonic() + self.config.batch_wait_timeout_s
                        while self._inbox_adds < self.config.max_batch_size and not self._stopping:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            self._cv.wait(remaining)
                self.step()
        except BaseException as e:  # noqa: BLE001 - any failure must reach the waiting requests
            self._failure = e
            with self._lock:
                self._closed = True
        self._fail_all("the engine stopped" if self._failure is None else f"the engine failed: {self._failure!r}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = [item for kind, item in self._inbox if kind == "add"]
            self._inbox.clear()
            self._inbox_adds = 0
        reason = "error" if self._failure is not None else "abort"
        for seq in pending:  # never reached the scheduler
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
            self._emit(seq, [], error=message)
        for seq in self.scheduler.all_unfinished():
            self.scheduler.finish(seq, reason)
            self._emit(seq, [], error=message)
        self._deliver()

    def shutdown(self, drain: bool = False, timeout: float | None = 60.0) -> None:
        """Stop the loop; with `drain`, first finish every request already accepted (new ones are still accepted
        until the loop runs dry)."""
        with self._cv:
            self._stopping = True
            self._drain = drain
            self._cv.notify_all()
            thread = self._thread
            if thread is None:
                self._closed = True
        if thread is not None:
            thread.join(timeout)
        else:
            self._fail_all("the engine stopped")

    def check_health(self) -> None:
        """Raise if the engine cannot serve (its loop failed or stopped)."""
        if self._failure is not None:
            raise RuntimeError(f"engine loop failed: {self._failure!r}")
        if self._closed:
            raise RuntimeError("engine is shut down")
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("engine loop thread died")

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
        results: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, params, sink=results.put, adapter=a) for p, a in zip(prompts, adapters, strict=True)]
        texts = {rid: "" for rid in ids}
        pending = set(ids)
        background = self.running
        while pending:
            if not background:
                self.step()
            while pending and (background or not results.empty()):
                out = results.get(timeout=timeout)
                if out.error is not None:
                    raise out.failure()
                texts[out.request_id] += out.text
                if out.finished:
                    pending.discard(out.request_id)
        return [texts[rid] for rid in ids]

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> float:
        """Mean next-token loss (nats per token) of the model on `texts` (each cut to the context window), computed
        between engine steps: a quality probe of a model version."""
        total, count = 0.0, 0
        for text in texts:
            ids = self.encode(text)[: self.max_seq_len]
            if len(ids) < 2:
                continue
            with self._step_lock:
                loss = self.runner.loss(ids)
            total, count = total + loss, count + len(ids) - 1
        if not count:
            raise ValueError("the probe texts hold no two tokens to score")
        return total / count

    def base_fingerprint(self) -> dict:
        """What must match between two versions that share traffic: the architecture and the tokenizer (hashed once
        per engine: replicas report it every metrics interval)."""
        if self._fingerprint is None:
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            self._fingerprint = {"architecture": self.args.hf_architecture, "vocab_size": self.args.vocab_size,
                                 "tokenizer": hashlib.blake2b(vocab.encode(), digest_size=8).hexdigest()}
        return dict(self._fingerprint)

    # -- statistics ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plain numbers about the engine's state and work so far (read from any thread)."""
        stale = time.monotonic() - self._last_step_time > _THROUGHPUT_WINDOW_S
        return {
            "waiting": self._inbox_adds + len(self.scheduler.waiting),
            "running": self.scheduler.num_running,
            "decode_batch_size": self._last_decode_batch,
            "prefilling": len(self.scheduler.prefilling),
            "max_batch_size": self.scheduler.max_batch_size,
            "tokens_per_s": 0.0 if stale else self._tokens_per_s,
            "expert_load": self.runner.expert_load.tolist(),
            "kv_cache_bytes": self.cache.nbytes,
            **self._counters,
            "prefill_forwards": self.runner.forwards["prefill"],
            "decode_forwards": self.runner.forwards["decode"],
            **self.scheduler.kv_stats(),
        }

    def drain_latency_samples(self) -> tuple[list[float], list[float]]:
        """Time-to-first-token and inter-token latency samples (seconds) recorded since the previous call."""
        ttft = [self._ttft.popleft() for _ in range(len(self._ttft))]
        itl = [self._itl.popleft() for _ in range(len(self._itl))]
        return ttft, itl

