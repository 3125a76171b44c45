"""The chat template of a served model: `moe_platform.tokenizer.ChatTemplate`, whose refusals become OpenAI-shaped
400 errors naming `messages`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_platform.serving.errors import InvalidRequestError
from moe_platform.tokenizer import ChatTemplate as _TemplateRenderer


class ChatTemplate(_TemplateRenderer):
    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """messages [{"role", "content"}, ...] -> prompt text; bad conversations raise InvalidRequestError."""
        try:
            return super().render(messages, add_generation_prompt)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(str(e), param="messages") from None
