"""Byte-level BPE tokenizer trained on the corpus, saved as a Hugging Face tokenizer directory.

The saved directory loads with `transformers.AutoTokenizer.from_pretrained` (as a `PreTrainedTokenizerFast`) and
with `load_tokenizer` (plain `tokenizers`, which serving and training use so they need no transformers install). Our
chat format exists twice: as the Jinja `CHAT_TEMPLATE` stored in tokenizer_config.json and as the pure-Python
`apply_chat_template`; tests keep the two rendering the same text. `ChatTemplate` renders any model's template
(an imported model's own) the way transformers does, for chat fine-tuning data and for serving alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
# Order fixes the ids: <|endoftext|> = 0, <|user|> = 1, <|assistant|> = 2, <|system|> = 3.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN)
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")

# 256 byte symbols + the special tokens + room for at least a few merges, otherwise BPE is pointless.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 16
DEFAULT_MODEL_MAX_LENGTH = 2048

# chat_template.jinja: where transformers >= 4.50 saves an imported model's chat template; generation_config.json
# carries an imported model's end-of-text ids (model_stop_ids) wherever its tokenizer goes.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                    "chat_template.jinja", "generation_config.json")

# Each turn is "<|role|>\n{content}<|endoftext|>\n"; a generation prompt is "<|assistant|>\n". Ending every turn
# with EOS teaches the model to emit EOS after its answer, which is where generation stops.
# `\\n` keeps the escape for Jinja's own string literal parser so no block-tag whitespace trimming can touch it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens on `texts`.

    Every one of the 256 byte symbols is in the initial alphabet, so any string encodes without an unknown token.
    The result can hold fewer than `vocab_size` tokens when the corpus runs out of pairs to merge; size model
    embeddings by `tok.get_vocab_size()`. Training is deterministic for the same input.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE vocabulary needs 256 byte tokens + "
            f"{len(SPECIAL_TOKENS)} special tokens + some merges, so at least {MIN_VOCAB_SIZE}"
        )
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string (wrap it in a list)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_checked_texts(texts), trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == expected_id, f"special token {token} did not get id {expected_id}"
    return tok


def _checked_texts(texts: Iterable[str]) -> Iterable[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
        yield text


def eos_id(tok: Tokenizer) -> int:
    """The id of `EOS_TOKEN` (also bos, pad and unk) in `tok`."""
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token; it was not built by moe_platform.tokenizer")
    return token_id


MODEL_CONFIG_FILES = ("generation_config.json", "config.json")  # where a model says its end-of-text ids


def stop_token_ids(tok: Tokenizer, configs: list[dict], source: str) -> list[int]:
    """A model's end-of-text ids: the `eos_token_id` (one id or a list of them) of the first of its
    generation_config.json / config.json documents that has one, else ours (`EOS_TOKEN`). The first id is the
    primary one (document separator, padding); generation stops at any of them (Qwen chat models end a turn with
    <|im_end|> and a document with <|endoftext|>)."""
    for config in configs:
        eos = config.get("eos_token_id")
        ids = [eos] if isinstance(eos, int) else [i for i in eos if isinstance(i, int)] if isinstance(eos, list) else []
        if ids:
            return ids
    try:
        return [eos_id(tok)]
    except ValueError:
        raise ValueError(f"{source}: cannot tell the end-of-text token (no eos_token_id in "
                         f"{' or '.join(MODEL_CONFIG_FILES)} and no {EOS_TOKEN} in the tokenizer)") from None


def model_stop_ids(tok: Tokenizer, model_dir: str | Path) -> list[int]:
    """`stop_token_ids` of a model (or tokenizer) directory."""
    d = Path(model_dir)
    configs = [json.loads((d / name).read_text()) for name in MODEL_CONFIG_FILES if (d / name).is_file()]
    return stop_token_ids(tok, configs, str(d))


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    """Write `TOKENIZER_FILES` into `out_dir` (created if needed) so `AutoTokenizer.from_pretrained` loads it."""
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with train_tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special_map = {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "additional_special_tokens": [USER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN],
    }
    added_tokens_decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "added_tokens_decoder": added_tokens_decoder,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        # Keep decode() a byte-exact inverse of encode(); the legacy cleanup would rewrite " ." to ".".
        "clean_up_tokenization_spaces": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)
    return out


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the `tokenizers.Tokenizer` that `save_tokenizer` wrote into `directory`."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {directory}: expected a directory written by save_tokenizer "
            f"(files {', '.join(TOKENIZER_FILES)})"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid tokenizers JSON file: {e}") from e
    return tok


def apply_chat_template(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render `messages` exactly as `CHAT_TEMPLATE` does, without Jinja or transformers."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        # transformers refuses an empty conversation too; the two renderers must agree on what is valid.
        raise ValueError("messages is empty; a chat needs at least one message")
    parts: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content' keys, got {message!r}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] has unknown chat role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        parts.append(f"<|{role}|>\n{content}{EOS_TOKEN}\n")
    if add_generation_prompt:
        parts.append(f"{ASSISTANT_TOKEN}\n")
    return "".join(parts)


class ChatTemplate:
    """A model's chat template: messages -> prompt text, exactly as `tokenizer.apply_chat_template` renders them.

    Ours (`CHAT_TEMPLATE`) renders with the pure-Python `apply_chat_template`. Any other template (an imported model's
    own) renders with a sandboxed Jinja environment set up like transformers' (trim_blocks, lstrip_blocks, loop
    controls, `tojson`, `raise_exception`, `strftime_now`). A conversation the template refuses raises ValueError.
    """

    def __init__(self, template: str | None = None, special_tokens: Mapping[str, str] | None = None):
        self.template = template or CHAT_TEMPLATE
        self.special_tokens = dict(special_tokens or {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN})
        self._jinja = None
        if self.template != CHAT_TEMPLATE:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._jinja = env.from_string(self.template)
            except TemplateError as e:
                raise ValueError(f"the chat template does not parse: {e}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        """The template of a tokenizer directory: chat_template.jinja, else tokenizer_config.json's chat_template
        (with its bos/eos tokens); ours if it has neither."""
        d = Path(model_dir)
        path = d / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if (d / "chat_template.jinja").is_file():  # where transformers >= 4.50 saves it
            config = {**config, "chat_template": (d / "chat_template.jinja").read_text(encoding="utf-8")}
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: Mapping | None) -> ChatTemplate:
        """The same from the parsed tokenizer_config.json (None: ours)."""
        if not config:
            return cls()
        specials = {k: _token_text(config[k]) for k in ("bos_token", "eos_token") if _token_text(config.get(k))}
        template = config.get("chat_template")
        if isinstance(template, list):  # transformers also allows [{"name": ..., "template": ...}]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(template if isinstance(template, str) else None, specials or None)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """messages [{"role", "content"}, ...] -> prompt text; a conversation the template refuses raises
        ValueError (TypeError for one that is not a list of dicts)."""
        if self._jinja is None:
            return apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        from jinja2 import TemplateError

        try:
            return self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                      **self.special_tokens)
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from None


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict with "content"."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)
