"""Built-in reward functions for GRPO (`grpo.reward = "moe_platform.rewards:NAME"`).

A reward function takes (row, completion): the prompt row as the data holds it (a dict with `prompt` and any other
fields) and the completion's text, and returns a number. Any importable function of that shape works the same way
(`grpo.reward = "my_module:my_reward"`); these two cover the common cases:

- `exact_match`: 1.0 when the completion's final answer equals the row's `answer` field, else 0.0. The final answer
  is what the completion marks as its answer: the last `\\boxed{...}`, else the last `<answer>...</answer>`, else what
  follows the last `####` (GSM8K's marker), else what follows the last "answer:" or "answer is"; a completion that
  marks none has its last word (letters, digits, `.`, `-` and `/` inside it) as its answer. Both sides are compared
  after `normalize_answer` (case, surrounding whitespace and punctuation, `$`, thousands separators, `1.0` vs `1`).
- `regex`: 1.0 when the whole completion (surrounding whitespace stripped) matches the row's `pattern` field as a
  Python regular expression with `re.DOTALL` (`re.fullmatch`: write `.*X.*` to ask for X anywhere), else 0.0. It
  rewards answering in a given format.

A row without the field a built-in reads is an error naming the field and the keys the row has.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

__all__ = ["exact_match", "final_answer", "normalize_answer", "regex"]

_BOXED = re.compile(r"\\boxed\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_MARKERS = (re.compile(r"####"), re.compile(r"answer\s*(?:is|:)", re.IGNORECASE))
_LAST_WORD = re.compile(r"[\w$][\w.,/$-]*")


def _field(row: Mapping, name: str, function: str):
    if not isinstance(row, Mapping) or name not in row:
        keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise KeyError(f"moe_platform.rewards:{function} reads the row's {name!r} field; this row has {keys}")
    return row[name]


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None when there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def final_answer(completion: str) -> str:
    """What `completion` gives as its final answer (see the module docstring); "" for an empty completion."""
    boxed = _boxed(completion)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1]
    for marker in _MARKERS:
        found = list(marker.finditer(completion))
        if found:
            rest = completion[found[-1].end():].strip()
            return rest.splitlines()[0] if rest else ""
    words = _LAST_WORD.findall(completion)
    return words[-1] if words else ""


def normalize_answer(text: object) -> str:
    """An answer in the form both sides are compared in: lower case, no surrounding whitespace, quotes or final
    punctuation, no `$` or thousands separators, inner whitespace collapsed, and a number without trailing zeros
    after its decimal point ("1.50" -> "1.5", "2.0" -> "2")."""
    s = " ".join(str(text).strip().lower().split())
    s = s.strip(" \"'`").rstrip(".!?;:,").replace("$", "")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


def exact_match(row: Mapping, completion: str) -> float:
    """1.0 when the completion's final answer is the row's `answer`, else 0.0."""
    return float(normalize_answer(final_answer(completion)) == normalize_answer(_field(row, "answer", "exact_match")))


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"moe_platform.rewards:regex: the row's pattern {pattern!r} is not a regular expression: "
                         f"{e}") from None


def regex(row: Mapping, completion: str) -> float:
    """1.0 when the completion (stripped) matches the row's `pattern` as a whole, else 0.0."""
    pattern = _field(row, "pattern", "regex")
    if not isinstance(pattern, str):
        raise TypeError(f"moe_platform.rewards:regex: the row's 'pattern' must be a string, got "
                        f"{type(pattern).__name__}")
    return float(_compiled(pattern).fullmatch(completion.strip()) is not None)
