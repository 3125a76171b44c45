"""GRPO's reward functions: loaded from `grpo.reward` ("module:function", or several with `grpo.reward_weights`),
checked before training starts, and called on every completion.

A reward function takes (row, completion text) and returns a number; several are summed with their weights. What
goes wrong is named with the function's "module:function":
- one that cannot be imported, or is no callable: when the config is checked, before any process starts;
- one that raises, or returns something that is not a finite number (None, a string, NaN, inf): before the first
  step, by calling every function on the first rows of the data with an empty completion and a short one
  (`RewardFunctions.check`; an empty completion is what a model that stops at once gives);
- the same on a real completion during training: the step fails with the function, the row (file and line) and the
  value or error, never a silent reward of 0.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moe_platform.config import reward_specs

PROBE_COMPLETIONS = ("", "The answer is 4.")


@dataclass(frozen=True)
class RewardFunction:
    spec: str  # "module:function"
    weight: float
    fn: Callable[[Mapping, str], object]


def load_reward(spec: str) -> Callable[[Mapping, str], object]:
    """Import "module:function", or raise ValueError naming it and why it cannot be had."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is the function's
        raise ValueError(f"grpo.reward {spec!r} cannot be imported: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"grpo.reward {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"grpo.reward {spec!r} is a {type(fn).__name__}, not a function of (row, completion)")
    return fn


class RewardFunctions:
    """The weighted reward functions of a config's [grpo] section."""

    def __init__(self, reward: str, weights: str = ""):
        self.functions = [RewardFunction(spec, weight, load_reward(spec))
                          for spec, weight in reward_specs(reward, weights)]

    @property
    def names(self) -> list[str]:
        return [f.spec for f in self.functions]

    def _value(self, f: RewardFunction, row: Mapping, completion: str, where: str) -> float:
        try:
            value = f.fn(row, completion)
        except Exception as e:  # noqa: BLE001 - named below, with the row
            raise ValueError(f"grpo.reward {f.spec!r} raised {type(e).__name__}: {e} (row {where}, completion "
                             f"{completion[:80]!r})") from e
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise ValueError(f"grpo.reward {f.spec!r} returned {value!r} ({type(value).__name__}), not a number "
                             f"(row {where}, completion {completion[:80]!r})")
        if not math.isfinite(float(value)):
            raise ValueError(f"grpo.reward {f.spec!r} returned {value!r}, not a finite number (row {where}, "
                             f"completion {completion[:80]!r})")
        return float(value)

    def score(self, rows: Sequence[Mapping], completions: Sequence[str],
              where: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the weighted sum per completion (N,), each function's own values (F, N)); completion i answers rows[i],
        which sits at where[i] (FILE:LINE). Raises ValueError naming the function that fails."""
        values = np.array([[self._value(f, row, text, w) for row, text, w in zip(rows, completions, where, strict=True)]
                           for f in self.functions], dtype=np.float64).reshape(len(self.functions), len(rows))
        weights = np.array([f.weight for f in self.functions], dtype=np.float64)
        return weights @ values, values

    def check(self, rows: Sequence[Mapping], where: Sequence[str]) -> None:
        """Call every function on `rows` with each of PROBE_COMPLETIONS: ValueError naming the first that raises or
        returns no finite number."""
        for row, w in zip(rows, where, strict=True):
            for text in PROBE_COMPLETIONS:
                for f in self.functions:
                    self._value(f, row, text, w)
