"""lm-evaluation-harness's model interface over an `Engine` in-process (`EngineLM`): what `moe-platform eval` uses
on a local export or a registry version, and a replica's eval gate on the versions it serves, with no HTTP between.

It answers every request type of lm-eval's `TemplateLM` with the engine's own computation, as the server answers
them over HTTP: `loglikelihood` (multiple choice) scores context + continuation as one prompt with its prompt log-
probabilities (each continuation token's, and whether it is the most likely one, from its rank);
`loglikelihood_rolling` (perplexity) cuts a document into lm-eval's rolling windows and scores each the same way;
`generate_until` generates with the task's stop strings, greedily unless it asks to sample. The requests of a call
are submitted together and batched by the engine; at most `max_in_flight` are queued at once, so an evaluation on a
serving engine leaves room for its live traffic. Imports lm-eval at import time: load this module only when it is
installed (moe_platform.serving.evaluation does)."""

from __future__ import annotations

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from moe_platform.serving.engine import Engine, SamplingParams

SCORE = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)  # the rank says whether a token is greedy
_GENERATION_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed"}


class EngineLM(TemplateLM):
    def __init__(self, engine: Engine, max_in_flight: int = 32, max_gen_toks: int = 256, seed: int = 1234):
        super().__init__()
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        # The longest prompt the engine takes: its context less the one position its last token samples into.
        self.max_length = engine.max_seq_len - 1

    @property
    def eot_token_id(self) -> int:
        return self.engine.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context starts from: the tokenizer's beginning-of-text token, else its end-of-text one
        (as lm-eval's transformers backend chooses)."""
        bos = self.engine.chat_template.special_tokens.get("bos_token")
        bos_id = self.engine.tokenizer.token_to_id(bos) if bos else None
        return self.eot_token_id if bos_id is None else bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.model_dir)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.engine.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.engine.tokenizer.decode(tokens, skip_special_tokens=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (the continuation's summed log-probability, whether each of its
        tokens is the most likely one). A pair longer than the context window keeps its end (the context is cut
        from the left), as lm-eval's backends do."""
        prompts, lengths = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval sent a continuation of no tokens to score")
            if len(continuation) >= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context window of "
                                 f"{self.engine.max_seq_len} tokens with any context before it")
            prompts.append((list(context) + list(continuation))[-self.max_length:])
            lengths.append(len(continuation))
        outs = self.engine.complete_batch(prompts, SCORE, max_in_flight=self.max_in_flight)
        results = []
        for out, n in zip(outs, lengths, strict=True):
            scored = out.prompt_logprobs[-n:]
            results.append((sum(lp for lp, _, _ in scored), all(rank == 1 for _, rank, _ in scored)))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over lm-eval's disjoint rolling windows of the context window."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                             prefix_token=self.prefix_token_id,
                                                             max_seq_len=self.max_length - 1, context_len=1):
                context, continuation = lm_utils.make_disjoint_window(window)
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            unknown = sorted(set(kwargs) - _GENERATION_KEYS)
            if unknown:
                raise ValueError(f"generation settings {unknown} of the task are not supported; supported: "
                                 f"{sorted(_GENERATION_KEYS)}")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.engine.max_seq_len - max_tokens):]
            sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            params.append(SamplingParams(
                max_tokens=min(max_tokens, self.engine.max_seq_len - len(ids)),
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0, top_k=int(kwargs.get("top_k", 0) or 0),
                seed=int(kwargs.get("seed", self.seed)), stop=[u for u in until if u]))
            prompts.append(ids)
        return [out.text for out in self.engine.complete_batch(prompts, params, max_in_flight=self.max_in_flight)]
