"""Per-request sampling parameters and one batched sampler for rows that each carry their own parameters.

Every request owns a `torch.Generator` and draws exactly one uniform number per generated token from it, then picks the
token by inverse CDF over its (temperature-scaled, top-k/top-p filtered) distribution. A seeded request therefore
yields the same tokens whatever else shares its batch. A temperature below `GREEDY_BELOW` (0 included) is greedy
(argmax) and draws nothing, as in vLLM: dividing by a tinier one overflows the logits. A top_k above the vocabulary
keeps every token: it is clamped to the vocabulary before it becomes a tensor, so no value can overflow one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moe_platform.checks import requirer

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_LOGPROBS = 20
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily


@dataclass
class SamplingParams:
    max_tokens: int | None = field(default=16, metadata={"doc": "tokens to generate at most; None fills the context"})
    temperature: float = field(default=1.0, metadata={"doc": "softmax temperature; 0 means greedy decoding"})
    top_p: float = field(default=1.0, metadata={"doc": "nucleus sampling: keep the smallest set with this mass"})
    top_k: int = field(default=0, metadata={"doc": "keep only the k most likely tokens; 0 (or -1) disables it"})
    seed: int | None = field(default=None, metadata={"doc": "seed of this request's sampler; None draws one"})
    stop: Sequence[str] = field(default=(), metadata={"doc": "strings that end the completion (not included)"})
    ignore_eos: bool = field(default=False, metadata={"doc": "keep generating after the end-of-text token"})
    logprobs: int | None = field(default=None, metadata={"doc": "return each generated token's log-probability "
                                                                "and the N most likely alternatives (None: none)"})
    prompt_logprobs: int | None = field(default=None, metadata={"doc": "return each prompt token's log-probability "
                                                                       "given the tokens before it, its rank and the "
                                                                       "N most likely alternatives (None: none)"})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        need = requirer("sampling parameters")

        if self.max_tokens is not None:
            need(_is_int(self.max_tokens), f"max_tokens must be an integer or None, got {self.max_tokens!r}")
            need(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        need(_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature!r}")
        need(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (or -1), got {self.top_k!r}")
        if self.seed is not None:
            need(_is_int(self.seed) and 0 <= self.seed < 2**63, f"seed must be an integer in [0, 2**63), "
                 f"got {self.seed!r}")
        need(len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            need(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS,
                 f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters, got "
                 f"{s[:40] + '...' if isinstance(s, str) and len(s) > 40 else s!r}")
        need(isinstance(self.ignore_eos, bool), f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                need(_is_int(value) and 0 <= value <= MAX_LOGPROBS,
                     f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def draw_uniforms(params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One uniform in [0, 1) per sampled row, from that row's own generator (greedy rows: 0, drawing nothing) -> (B,).
    Drawn apart from `sample_tokens`, so a batch that fails can be sampled again row by row with the same draws."""
    u = torch.zeros(len(params))
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        u[rows] = torch.cat([torch.rand(1, generator=generators[i]) for i in rows])
    return u


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None], uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) fp32, one SamplingParams and generator per row -> next token ids (B,) int64. `uniforms` (B,):
    the rows' draws from `draw_uniforms` (None: drawn here)."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"sample_tokens expects logits (B, V) with B params and generators, got "
                         f"{tuple(logits.shape)}, {len(params)}, {len(generators)}")
    out = torch.argmax(logits, dim=-1)  # greedy rows are done; sampled rows are overwritten below
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    if uniforms is None:
        uniforms = draw_uniforms(params, generators)
    sub = logits[rows].float()  # (S, V)
    vocab = sub.shape[-1]
    temps = torch.tensor([params[i].temperature for i in rows], dtype=sub.dtype)
    # top_k 0 (disabled) and any top_k above the vocabulary keep every token.
    top_k = torch.tensor([min(params[i].top_k, vocab) or vocab for i in rows])
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=sub.dtype)
    sub = sub / temps[:, None]
    u = uniforms[rows]  # (S,)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = torch.sort(sub, dim=-1, descending=True)  # (S, V)
        rank = torch.arange(vocab)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token while the mass before it is below top_p, so the most likely token always survives.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
        picked = _inverse_cdf(probs, u)
        out[rows] = order.gather(-1, picked[:, None]).squeeze(-1)
    else:
        out[rows] = _inverse_cdf(torch.softmax(sub, dim=-1), u)
    return out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (S, V) unnormalised non-negative, u (S,) in [0, 1) -> index (S,) drawn from each row's distribution."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # Rounding can put the target at the very end; fall back to the last token that has any probability.
    last_nonzero = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.minimum(idx, last_nonzero)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int | None]
                   ) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """For each row of logits (B, V): the log-probability of `tokens[i]` under the model's distribution (the
    log-softmax of the raw logits, before temperature and filtering, as vLLM reports it) and the `tops[i]` most
    likely (token, log-probability) pairs; None for rows with tops[i] None."""
    rows = [i for i, k in enumerate(tops) if k is not None]
    out: list = [None] * len(tops)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    k = min(max(tops[i] for i in rows), lp.shape[-1])  # a vocabulary smaller than the alternatives asked for
    values, ids = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    chosen = lp.gather(-1, torch.tensor([[tokens[i]] for i in rows])).squeeze(-1).tolist()
    values, ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        out[i] = (chosen[j], list(zip(ids[j][:tops[i]], values[j][:tops[i]], strict=True)))
    return out


def prompt_token_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]
                          ) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """For each row of logits (M, V), the logits at one prompt position: the log-probability of the prompt's next
    token `tokens[i]` (log-softmax of the raw logits), its rank among the vocabulary (1 = the most likely; ties
    share the better rank, as vLLM counts) and the `tops[i]` most likely (token, log-probability) pairs. The token's
    value and the top values come from one tensor, so a greedy token's log-probability equals the top one exactly."""
    if not len(tokens):
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    chosen = lp.gather(-1, torch.tensor(list(tokens))[:, None])  # (M, 1)
    ranks = ((lp > chosen).sum(-1) + 1).tolist()
    k = min(max(tops), lp.shape[-1])
    values, ids = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    values, ids, chosen = values.tolist(), ids.tolist(), chosen.squeeze(-1).tolist()
    return [(chosen[i], ranks[i], list(zip(ids[i][:tops[i]], values[i][:tops[i]], strict=True)))
            for i in range(len(tokens))]
