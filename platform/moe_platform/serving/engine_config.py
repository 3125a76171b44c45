"""The engine's options (`EngineConfig`): one definition for the Serve config's `engine:` block, `moe-platform serve
--engine KEY=VALUE` and the Python API, each checked when it is made (an unknown key or a bad value names itself)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from moe_platform.checks import requirer
from moe_platform.serving.cache import KV_CACHE_DTYPES
from moe_platform.serving.quant import QUANTIZATIONS

BACKENDS = ("native", "vllm")
AUTO_OUTPUTS_PER_STEP = 16  # stream_interval 0: about this many stream outputs per engine step, beyond one per token
CORES = ("auto", "process", "thread")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    backend: str = field(default="native", metadata={"doc": "native (this engine) or vllm (vLLM's async engine in the "
                                                            "replica; serving/vllm_engine.py, the vllm extra)"})
    core: str = field(default="auto", metadata={"doc": "where a served native engine steps (load_engine: Serve "
                                                       "replicas, eval gates): process (a child process of its own, "
                                                       "as vLLM's engine core, so the replica's HTTP and streaming "
                                                       "threads do not share its GIL; a registry version is written "
                                                       "to a local directory for it), thread (a thread of the "
                                                       "replica; registry weights zero-copy) or auto (process for an "
                                                       "export directory, thread for a registry version). The vllm "
                                                       "backend always runs vLLM's core in a process"})
    stream_interval: int = field(
        default=0, metadata={"doc": "new tokens a stream gathers per output after its first (the first is never "
                                    "held): N, or 0 for auto (one output per token while at most "
                                    "16 requests are in flight; beyond that the streams share about 16 outputs per "
                                    "engine step, so each SSE event through Serve carries more tokens under load)"})
    max_batch_size: int = field(default=64, metadata={"doc": "sequences running at once at most (decoded together)"})
    batch_wait_timeout_s: float = field(
        default=0.0, metadata={"doc": "an idle engine waits this long for more requests before its first prefill "
                                      "(0: none; requests arriving later join the running batch at the next step)"})
    prefill_token_budget: int = field(
        default=2048, metadata={"doc": "prompt tokens prefilled per step at most (long prompts are chunked)"})
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
    windowed_kv_cache: bool = field(default=True, metadata={"doc": "models with as many sliding-window as "
                                                                   "full-attention layers (gpt-oss): the sliding "
                                                                   "layers keep only their window's KV blocks (paged); "
                                                                   "false: every layer keeps every position's"})
    mla_kv_cache: str = field(default="latent", metadata={"doc": "multi-head latent attention models (DeepSeek): "
                                                                 "latent (the compressed latent and rotary key per "
                                                                 "token, attention on the latent; paged) or expanded "
                                                                 "(per-head keys and values)"})
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

        need(self.backend in BACKENDS, f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        need(self.core in CORES, f"core must be one of {list(CORES)}, got {self.core!r}")
        need(isinstance(self.stream_interval, int) and not isinstance(self.stream_interval, bool)
             and self.stream_interval >= 0, f"stream_interval must be an integer >= 0, got {self.stream_interval!r}")
        for name in ("max_batch_size", "prefill_token_budget", "max_waiting", "max_lora_rank", "block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        need(isinstance(self.batch_wait_timeout_s, (int, float)) and 0 <= self.batch_wait_timeout_s <= 10,
             f"batch_wait_timeout_s must be in [0, 10] seconds, got {self.batch_wait_timeout_s!r}")
        need(isinstance(self.max_seq_len, int) and self.max_seq_len >= 0,
             f"max_seq_len must be an integer >= 0, got {self.max_seq_len!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
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
        need(isinstance(self.windowed_kv_cache, bool),
             f"windowed_kv_cache must be true or false, got {self.windowed_kv_cache!r}")
        need(self.mla_kv_cache in ("latent", "expanded"), f"mla_kv_cache must be latent or expanded, got "
                                                          f"{self.mla_kv_cache!r}")
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
        if self.backend == "vllm":  # what vLLM's engine does not do as ours does (serving/vllm_engine.py)
            need(self.quantization == "none", "backend vllm serves unquantized exports (quantization: none); use "
                                              "backend native for int8/int4 weights")
            need(self.kv_cache_layout == "paged", "backend vllm has a paged KV cache only (kv_cache_layout: paged)")
            need(self.kv_cache_dtype in ("auto", "fp8"), f"backend vllm takes kv_cache_dtype auto or fp8, got "
                                                         f"{self.kv_cache_dtype!r}")
            need(not self.max_loras, "backend vllm does not serve LoRA adapters yet (vLLM's CPU build has no LoRA "
                                     "kernel for MoE layers); serve adapters with backend native")

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


__all__ = ["AUTO_OUTPUTS_PER_STEP", "BACKENDS", "CORES", "DTYPES", "EngineConfig"]
