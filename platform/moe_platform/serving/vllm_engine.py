"""`engine.backend = "vllm"`: vLLM's async engine (`AsyncLLM`) inside our replica, behind our engine's interface.

Everything above the engine stays ours: the OpenAI front and its validation, API keys, versions, traffic split,
rollouts and their quality probe, registry:// models, metrics. So prompts are tokenized and checked by our
`InputProcessor`, and vLLM gets token ids; vLLM returns token ids (and log-probabilities), which our
`OutputProcessor` detokenizes and checks against EOS, stop strings and max_tokens, exactly as the native engine
does. A request our side finishes (a stop string) is aborted in vLLM. Greedy tokens equal the native engine's.

vLLM runs on its own asyncio loop in a background thread of the replica (its engine core is a child process, as in
`vllm serve`). Registry versions are written to a local export directory first, since vLLM reads models from disk.

Not (yet) on this backend, each refused with an error naming the option (`EngineConfig`): int8/int4 weights of
ours, the slot KV layout, int8 KV, LoRA adapters (vLLM's CPU build has no LoRA kernel for MoE layers) and in-place
weight updates (RL weight sync runs on the native backend; a model change still swaps in a second engine).

vLLM pins other versions than our lock (transformers < 5.20), so on CPU machines it lives in a venv of its own
(`scripts/setup-vllm.sh`, which also installs moe-platform there); the replica runs from that venv.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from moe_platform.model.args import ModelArgs
from moe_platform.serving.engine import ElsewhereFront, EngineConfig
from moe_platform.serving.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    NotFoundError,
)
from moe_platform.serving.output_processor import OutputProcessor
from moe_platform.serving.outputs import RequestOutput
from moe_platform.serving.sampling import SamplingParams
from moe_platform.serving.scheduler import SeqStatus
from moe_platform.serving.scheduler import SequenceState as Seq

INSTALL_HINT = ("engine backend vllm needs vLLM in the replica's Python: `pip install 'moe-platform[vllm]'` (GPU "
                "nodes), or on CPU machines `bash scripts/setup-vllm.sh` and run Ray from the venv it prints")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STARTUP_TIMEOUT_S = 600.0


def _vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    from vllm import SamplingParams as VSamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM, AsyncEngineArgs, VSamplingParams, TokensPrompt, RequestOutputKind


def kv_cache_bytes(args: ModelArgs, config: EngineConfig, max_seq_len: int) -> int:
    """The KV cache vLLM gets: `kv_cache_memory_bytes`, else (0) as the native engine sizes it on the CPU,
    max_batch_size x max_seq_len tokens of every layer's keys and values (MLA: its latent and rotary key)."""
    if config.kv_cache_memory_bytes:
        return config.kv_cache_memory_bytes
    return config.max_batch_size * max_seq_len * _token_bytes(args, config)


def _token_bytes(args: ModelArgs, config: EngineConfig) -> int:
    per_layer = (args.kv_lora_rank + args.qk_rope_head_dim if args.mla
                 else 2 * args.n_kv_heads * args.resolved_head_dim)
    return args.n_layers * per_layer * _DTYPE_BYTES[config.dtype]


def _stat_logger(sink: dict):
    """A factory of vLLM stat loggers that keep its scheduler's numbers in `sink` under the native engine's names."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerNumbers(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                cache = scheduler_stats.prefix_cache_stats
                sink.update(vllm_running=scheduler_stats.num_running_reqs,
                            vllm_waiting=scheduler_stats.num_waiting_reqs,
                            kv_cache_usage=scheduler_stats.kv_cache_usage,
                            steps=scheduler_stats.step_counter or sink["steps"] + 1)
                sink["prefix_cache_queries"] += cache.queries
                sink["prefix_cache_hits"] += cache.hits
            if iteration_stats is not None:
                sink["num_preemptions"] += iteration_stats.num_preempted_reqs

        def log_engine_initialized(self):
            pass

    return SchedulerNumbers


def _logprob_entry(token: int, entry: Mapping | None, k: int) -> tuple[float, list[tuple[int, float]]]:
    """vLLM's {token: Logprob} of one position as ours: (the token's log-probability, [(token, lp)] top k)."""
    entry = entry or {}
    tops = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                  key=lambda item: item[1].rank)
    return entry[token].logprob, [(t, lp.logprob) for t, lp in tops[:k]]


class VllmEngine(ElsewhereFront):
    """vLLM's `AsyncLLM` as a serving engine: the native `Engine`'s interface (`submit`, `complete_batch`, `score`,
    `stats`, health, shutdown) with our input and output processing around vLLM's scheduler and model runner."""

    model_dir_prefix = "moe-vllm-model-"

    def __init__(self, model_dir: str | Path, config: EngineConfig, source: str | None = None,
                 owned_dir: Path | None = None):
        AsyncLLM, AsyncEngineArgs, self._VSamplingParams, self._TokensPrompt, self._OutputKind = _vllm()
        self.config = config
        self._owned_dir = owned_dir  # a registry version written out for vLLM: removed at shutdown
        self._init_front_from_dir(model_dir, config, source)
        self.outputs = OutputProcessor(self.stop_token_ids, self.max_seq_len, self._finish, lambda seq: None)
        self._seqs: dict[str, Seq] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self.counters = {"prompt_tokens": 0, "prompt_logprob_tokens": 0}
        self._scheduler = {"vllm_running": 0, "vllm_waiting": 0, "kv_cache_usage": 0.0, "steps": 0,
                           "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0}
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) of outputs: tokens_per_s
        self._chores: set[asyncio.Task] = set()
        self.failure: BaseException | None = None
        self.closed = False
        self._kv_bytes = kv_cache_bytes(self.args, config, self.max_seq_len)
        self._kv_tokens = self._kv_bytes // _token_bytes(self.args, config)  # vLLM reports the used fraction
        engine_args = AsyncEngineArgs(
            model=str(model_dir), tokenizer=str(model_dir), dtype=config.dtype, seed=config.seed,
            max_model_len=self.max_seq_len, max_num_seqs=config.max_batch_size,
            max_num_batched_tokens=max(config.prefill_token_budget, config.max_batch_size),
            enable_prefix_caching=config.enable_prefix_caching,  # block size: vLLM picks its attention backend's
            kv_cache_memory_bytes=self._kv_bytes,
            kv_cache_dtype=config.kv_cache_dtype, enforce_eager=True, trust_remote_code=False,
            disable_log_stats=False)
        from vllm.platforms import current_platform

        # vLLM's CPU sampler fails its whole engine on a seeded request (its generators take no offset): refused
        self._cpu = current_platform.is_cpu()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="moe-vllm-engine", daemon=True)
        self._thread.start()

        async def build():
            return AsyncLLM.from_engine_args(engine_args, stat_loggers=[_stat_logger(self._scheduler)])

        try:
            self.llm = asyncio.run_coroutine_threadsafe(build(), self._loop).result(STARTUP_TIMEOUT_S)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options) -> VllmEngine:
        config = EngineConfig.from_options(**options)
        d = Path(model_dir)
        if not (d / "config.json").is_file() or not (d / "tokenizer.json").is_file():
            raise ValueError(f"{d} is not an export directory vLLM can read (config.json and tokenizer.json)")
        return cls(d, config)

    # -- requests ------------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, sink=None, adapter: str | None = None) -> str:
        if adapter is not None:
            raise NotFoundError(f"adapter {adapter!r} is not loaded: this server's engine (backend vllm) serves no "
                                f"LoRA adapters", param="model", code="model_not_found")
        if params is not None and params.seed is not None and not params.greedy and self._cpu:
            raise InvalidRequestError("this server's engine (vLLM's CPU build) does not take per-request seeds; "
                                      "leave seed out", param="seed")
        with self._lock:
            self._ids += 1
            rid = request_id or f"req-{self._ids}"
        seq = self.inputs.make_sequence(prompt, params, rid, sink)  # validates (400s name the parameter)
        seq.status = SeqStatus.DECODE  # vLLM schedules it; ours only tracks whether it finished
        with self._lock:
            self._check_open()
            if len(self._seqs) >= self.config.max_batch_size + self.config.max_waiting:
                raise EngineOverloadedError(f"the engine holds {len(self._seqs)} requests (max_batch_size + "
                                            f"max_waiting); retry later")
            if rid in self._seqs:
                raise InvalidRequestError(f"request id {rid!r} is in use", param="request_id")
            self._seqs[rid] = seq
            self.counters["prompt_tokens"] += seq.prompt_len
            self._loop.call_soon_threadsafe(self._launch, seq)  # under the lock: shutdown stops the loop after
        return rid

    def _launch(self, seq: Seq) -> None:
        if seq.request_id not in self._seqs:  # aborted before it started
            return
        task = self._loop.create_task(self._run(seq))
        self._tasks[seq.request_id] = task
        # whatever ends the task (even a cancel before its first step), the request finishes and leaves the engine
        task.add_done_callback(lambda _, seq=seq: self._retire(seq))

    def _retire(self, seq: Seq) -> None:
        self._tasks.pop(seq.request_id, None)
        with self._lock:
            self._seqs.pop(seq.request_id, None)
        self._end(seq)

    def _end(self, seq: Seq) -> None:
        """Finish `seq` if nothing else did: "abort" while the engine runs, an error (503) once it is shut down."""
        if seq.status is SeqStatus.FINISHED:
            return
        if self.closed:
            self._finish(seq, "error")
            self.outputs.emit(seq, [], error="the engine stopped")
        else:
            self._finish(seq, "abort")
            self.outputs.emit(seq, [])
        self.outputs.deliver()

    def _vllm_params(self, seq: Seq):
        p = seq.params
        return self._VSamplingParams(
            n=1, temperature=p.temperature, top_p=p.top_p,
            top_k=min(p.top_k, self.args.vocab_size) if p.top_k > 0 else 0,  # a huge top_k keeps every token
            seed=None if p.greedy else p.seed,  # vLLM draws one for requests without
            max_tokens=seq.max_tokens, stop_token_ids=[] if p.ignore_eos else sorted(self.stop_token_ids),
            ignore_eos=p.ignore_eos, logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs, detokenize=False,
            skip_special_tokens=False, output_kind=self._OutputKind.DELTA)

    async def _run(self, seq: Seq) -> None:
        """One request through vLLM, on the engine loop: each delta of tokens goes through our output processor;
        when that finishes the request (a stop string), the stream is closed, which aborts it in vLLM."""
        outputs: list[RequestOutput] = []
        stream = self.llm.generate(self._TokensPrompt(prompt_token_ids=seq.prompt_ids), self._vllm_params(seq),
                                   seq.request_id)
        try:
            async for out in stream:
                if out.prompt_logprobs is not None and seq.prompt_logprobs is not None:
                    k = seq.params.prompt_logprobs
                    for i in range(1, seq.prompt_len):
                        entry = out.prompt_logprobs[i]
                        lp, tops = _logprob_entry(seq.prompt_ids[i], entry, k)
                        seq.prompt_logprobs[i] = (lp, entry[seq.prompt_ids[i]].rank, tops)
                    self.counters["prompt_logprob_tokens"] += seq.prompt_len - 1
                done = False
                now = time.monotonic()
                completion = out.outputs[0]
                for i, token in enumerate(completion.token_ids):
                    lp = (None if seq.params.logprobs is None
                          else _logprob_entry(token, completion.logprobs[i], seq.params.logprobs))
                    done = self.outputs.append_token(seq, token, now, outputs, lp) is not False
                    if done:
                        break
                self._recent.append((now, len(completion.token_ids)))
                if not done and out.finished:  # vLLM ended it first (it should not: the same limits)
                    seq.stopper.append(seq.detokenizer.flush())
                    self._finish(seq, "stop" if completion.finish_reason == "stop" else "length")
                    self.outputs.emit(seq, outputs)
                    done = True
                self.outputs.deliver()
                if done:
                    break
        except asyncio.CancelledError:
            self._end(seq)
            # a cancel can land while vLLM registers the request, before its stream can abort it: abort it here
            self._background(self.llm.abort(seq.request_id))
            raise
        except Exception as e:  # noqa: BLE001 - this request's failure, or vLLM's engine died (then all fail)
            if self.llm.errored:
                self.failure = self.failure or e
                self._finish(seq, "error")
                self.outputs.emit(seq, outputs, error=f"the engine failed: {e!r}")
            else:
                self.outputs.fail_request(seq, outputs, e)
            self.outputs.deliver()
        finally:
            await stream.aclose()  # a request we finished first is aborted in vLLM now, not when collected

    def _background(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _finish(self, seq: Seq, reason: str) -> None:
        if seq.status is not SeqStatus.FINISHED:
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = reason

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it finishes with reason "abort"."""
        def cancel():
            task = self._tasks.get(request_id)
            if task is not None:
                task.cancel()
                return
            with self._lock:  # not launched yet
                seq = self._seqs.pop(request_id, None)
            if seq is not None:
                self._end(seq)
        try:
            self._loop.call_soon_threadsafe(cancel)
        except RuntimeError:  # the loop is closed: the engine is shut down and its requests are finished
            pass

    def num_in_flight(self) -> int:
        return len(self._seqs)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def step(self) -> list[RequestOutput]:
        raise RuntimeError("backend vllm runs its own loop: use submit, stream or complete_batch")

    # -- what this backend does not do -----------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str, base_dir: Path | None = None):
        from moe_platform.serving.adapters import AdapterLoadError

        raise AdapterLoadError("backend vllm serves no LoRA adapters yet; serve them with engine.backend native",
                               param="lora_name")

    def unload_adapter(self, name: str) -> None:
        raise NotFoundError(f"adapter {name!r} is not loaded: backend vllm serves no LoRA adapters",
                            param="lora_name")

    put_adapter = load_adapter

    def loaded_adapters(self) -> list[dict]:
        return []

    def update_weights(self, state: Mapping[str, torch.Tensor], keepalive: object = None) -> int:
        raise ValueError("update_weights: backend vllm takes new weights as a new model (user_config.model, a "
                         "second engine); in-place weight sync (RL) runs on engine.backend native")

    # -- loop, health, shutdown ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.closed

    def check_health(self) -> None:
        if self.failure is not None or self.llm.errored:
            raise RuntimeError(f"vLLM's engine failed: {self.failure or self.llm.dead_error!r}")
        if self.closed:
            raise RuntimeError("engine is shut down")
        if not self._thread.is_alive():
            raise RuntimeError("engine loop thread died")

    def shutdown(self, drain: bool = False, timeout: float | None = 60.0) -> None:
        """Stop vLLM's engine (its core process goes too); with `drain`, first let the requests in flight finish
        (new ones are still accepted meanwhile). Requests left get an error (503), as from the native engine."""
        if drain:
            end = None if timeout is None else time.monotonic() + timeout
            while self._seqs and (end is None or time.monotonic() < end):
                time.sleep(0.05)
        with self._lock:
            if self.closed:
                return
            self.closed = True

        async def stop() -> None:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *self._chores, return_exceptions=True)
            with self._lock:
                left, self._seqs = list(self._seqs.values()), {}
            for seq in left:  # accepted, never launched
                self._end(seq)
            self.llm.shutdown()

        try:
            if self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()
            if self._owned_dir is not None:
                shutil.rmtree(self._owned_dir, ignore_errors=True)

    # -- quality probe and statistics ----------------------------------------------------------------------------
    def score(self, texts: Sequence[str]) -> float:
        """Mean next-token loss (nats per token) on `texts`, from vLLM's prompt log-probabilities."""
        total, count = 0.0, 0
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = [ids for ids in (self.encode(t)[: self.max_seq_len - 1] for t in texts) if len(ids) >= 2]
        if not prompts:
            raise ValueError("the probe texts hold no two tokens to score")
        for out in self.complete_batch(prompts, params):
            lps = [entry[0] for entry in out.prompt_logprobs[1:]]
            total, count = total - sum(lps), count + len(lps)
        return total / count

    def stats(self) -> dict:
        """The native engine's numbers, as far as vLLM's front shows them (the same names reach the metrics)."""
        now = time.monotonic()
        recent = sum(n for t, n in list(self._recent) if now - t <= 5.0)
        vllm = dict(self._scheduler)
        return {
            "waiting": vllm["vllm_waiting"], "running": vllm["vllm_running"],
            "decode_batch_size": vllm["vllm_running"], "prefilling": 0, "max_batch_size": self.config.max_batch_size,
            "tokens_per_s": recent / 5.0,
            "expert_load": [],  # vLLM does not count tokens per expert
            "kv_cache_bytes": self._kv_bytes, "kv_cache_capacity": self._kv_tokens,  # in tokens
            "kv_cache_used": round(vllm["kv_cache_usage"] * self._kv_tokens),
            "requests_finished": self.outputs.counters["requests_finished"],
            "prompt_tokens": self.counters["prompt_tokens"],
            "generated_tokens": self.outputs.counters["generated_tokens"],
            "steps": vllm["steps"], "prefill_forwards": 0, "decode_forwards": 0,
            "prompt_logprob_tokens": self.counters["prompt_logprob_tokens"],
            "kv_cache_usage": vllm["kv_cache_usage"], "num_preemptions": vllm["num_preemptions"],
            "prefix_cache_queries": vllm["prefix_cache_queries"], "prefix_cache_hits": vllm["prefix_cache_hits"],
            "in_flight": len(self._seqs),
        }

    def drain_latency_samples(self) -> tuple[list[float], list[float]]:
        return self.outputs.drain_latency_samples()


__all__ = ["VllmEngine", "kv_cache_bytes"]
