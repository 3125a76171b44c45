"""What the command line's serving commands share: keys read from files or the environment (never argv), the
loopback check of a bind address, and engine options given as KEY=VALUE."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def read_key(path: str | None, env: str, option: str) -> str | None:
    """A key from the file `path` (its content without surrounding whitespace), else from the environment variable
    `env`, else None. Never from the command line, where `ps` and the shell history would show it."""
    if not path:
        return os.environ.get(env, "").strip() or None
    file = Path(path).expanduser()
    try:
        key = file.read_text().strip()
        mode = file.stat().st_mode
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot read the key: {e.strerror or e}") from None
    if not key:
        raise ValueError(f"{option} {path}: the file is empty")
    if mode & 0o077:
        print(f"moe-platform serve: warning: {option} {path} can be read by other users; chmod 600 it",
              file=sys.stderr, flush=True)
    return key


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def engine_options(pairs: list[str]) -> dict:
    """`--engine KEY=VALUE` items -> engine options, each value read as YAML (1 -> int, true -> bool, thread -> str)
    and the whole checked as `EngineConfig` checks a config's engine: block (an unknown key or bad value names it)."""
    import yaml

    from moe_platform.serving.engine import EngineConfig

    options = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine {item!r}: expected KEY=VALUE, e.g. --engine core=thread")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    EngineConfig.from_options(**options)
    return options
