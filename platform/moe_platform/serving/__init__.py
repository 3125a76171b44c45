"""moe_platform.serving: OpenAI-compatible inference for exported MoE models.

- `engine`: `Engine` (paged KV cache with prefix caching, continuous batching, sampling) and `SamplingParams`; its
  layers `model_loader`, `model_runner`, `scheduler`, `kv_blocks` and `cache`; no Ray import, so the
  engine runs and is tested on its own (`Engine.from_pretrained(dir).generate(prompt, SamplingParams(...))`).
- `openai_api` / `protocol`: the OpenAI HTTP layer (validation, JSON and SSE shapes, errors) over an engine.
- `tokenizer_api`: vLLM's /tokenize, /detokenize and /tokenizer_info over the served tokenizer.
- `evaluation` / `lm_eval_backend`: lm-evaluation-harness against a server or in-process on an engine (`moe-platform
  eval`, the rollout eval gate); lm-eval is optional and imported only there.
- `loader`: `load_engine(model)` for an export directory or a `registry://NAME[@VERSION]` version.
- `app`: the Ray Serve deployment, `build_app` (import path for `serve run serve/config.yaml`) and `run_server`.
"""

from moe_platform.serving.engine import Engine, EngineConfig, RequestOutput
from moe_platform.serving.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
