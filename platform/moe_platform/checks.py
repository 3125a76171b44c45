"""Validation helper shared by every layer (model args, config, engine and sampling options): one message form."""

from __future__ import annotations

from collections.abc import Callable


def requirer(what: str, error: type[Exception] = ValueError) -> Callable[[bool, str], None]:
    """`need = requirer("model config")`; `need(ok, msg)` raises `error("invalid model config: msg")` unless ok."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise error(f"invalid {what}: {msg}")

    return need


__all__ = ["requirer"]
