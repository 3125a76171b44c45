"""Requests in (vLLM's input processor): prompt text or token ids, chat rendering and max_tokens become a validated
`SequenceState` for the engine core, with its sampling generator, detokenizer and stop-string matcher. Runs on the
caller's thread (a request handler, or a worker thread for a long prompt); holds no engine state."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence

from moe_platform.serving.chat import ChatTemplate
from moe_platform.serving.detokenizer import IncrementalDetokenizer, StopStringMatcher, max_prompt_chars
from moe_platform.serving.errors import ContextLengthError, InvalidRequestError
from moe_platform.serving.sampling import SamplingParams, make_generator
from moe_platform.serving.scheduler import SequenceState


class InputProcessor:
    def __init__(self, tokenizer, chat_template: ChatTemplate, vocab_size: int, max_seq_len: int,
                 eos_token_id: int, seed: int):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.eos_token_id = eos_token_id
        # Text longer than this cannot fit the context: refused before it is tokenized (detokenizer.py).
        self.max_prompt_chars = max_prompt_chars(tokenizer, max_seq_len)
        self._rng = random.Random(seed)

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
            vocab = self.vocab_size
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

    def make_sequence(self, prompt: str | Sequence[int], params: SamplingParams | None, request_id: str,
                      sink=None) -> SequenceState:
        """A validated request for the engine core (InvalidRequestError / ContextLengthError name what is wrong)."""
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
        seq = SequenceState(request_id, ids, params, max_tokens, time.monotonic(), sink=sink,
                            generator=None if params.greedy else make_generator(seed))
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None] * len(ids)  # position 0 has no tokens before it to be scored on
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.stopper = StopStringMatcher(params.stop)
        return seq
