"""The chat template of an export: messages -> prompt text, exactly as the tokenizer's `chat_template` renders them.

Exports written by moe-platform carry `moe_platform.tokenizer.CHAT_TEMPLATE`; that one renders with the
pure-Python `apply_chat_template` (no Jinja needed, and the tokenizer tests keep the two identical). Any other
template found in tokenizer_config.json (e.g. a foreign Mixtral export) renders with a sandboxed Jinja environment,
like transformers does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from moe_platform.serving.errors import InvalidRequestError
from moe_platform.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, apply_chat_template


class ChatTemplate:
    def __init__(self, template: str | None = None, special_tokens: Mapping[str, str] | None = None):
        self.template = template or CHAT_TEMPLATE
        self.special_tokens = dict(special_tokens or {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN})
        self._jinja = None
        if self.template != CHAT_TEMPLATE:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            self._jinja = env.from_string(self.template)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        """Read `chat_template` (and bos/eos tokens) from tokenizer_config.json; fall back to ours if absent."""
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return cls()
        return cls.from_config(json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def from_config(cls, config: Mapping | None) -> ChatTemplate:
        """The same from the parsed tokenizer_config.json (None: ours)."""
        if not config:
            return cls()
        specials = {k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)}
        template = config.get("chat_template")
        if isinstance(template, list):  # transformers also allows [{"name": ..., "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(template if isinstance(template, str) else None, specials or None)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """messages [{"role", "content"}, ...] -> prompt text; bad conversations raise InvalidRequestError."""
        if self._jinja is None:
            try:
                return apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            except (TypeError, ValueError) as e:
                raise InvalidRequestError(str(e), param="messages") from None
        from jinja2 import TemplateError

        try:
            return self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                      **self.special_tokens)
        except TemplateError as e:
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", param="messages") from None


def _raise_exception(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)
