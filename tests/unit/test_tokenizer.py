"""Byte-level BPE tokenizer: determinism, special tokens, save/load round trip through transformers, chat template."""

from __future__ import annotations

import json

import pytest

from moe_platform.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    apply_chat_template,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 10,
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n" * 5,
] * 20

SAMPLES = [
    "hello world",
    "def f(x):\n    return x * 2  # doubled\n",
    " leading space and trailing  ",
    "unicode: héllo wörld, 日本語, emoji 🙂🚀",
    "tabs\tand\r\nwindows newlines . , ; spaces before punctuation !",
    "special <|user|> tokens <|endoftext|> inline",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hello\nthere"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "   spaces   "},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "ünïcödé 🙂"}],
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, 320)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=512)


@pytest.fixture(scope="module")
def hf_tok(saved_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))


def test_training_is_deterministic(tok):
    again = train_tokenizer(CORPUS, 320)
    assert again.to_str() == tok.to_str()
    assert tok.get_vocab_size() <= 320


def test_special_token_ids(tok):
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
    assert eos_id(tok) == 0 == tok.token_to_id(EOS_TOKEN)


@pytest.mark.parametrize("text", SAMPLES)
def test_any_text_round_trips(tok, text):
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_unseen_bytes_encode_without_unknowns(tok):
    text = "\x01\x7f€ﬁ𝔘"  # none of these occur in the training corpus
    assert tok.decode(tok.encode(text).ids) == text


def test_merges_are_learned(tok):
    # More than one token per byte would mean BPE learned nothing from the corpus.
    assert len(tok.encode("return a + b").ids) < len("return a + b")


@pytest.mark.parametrize("vocab_size", [0, 256, MIN_VOCAB_SIZE - 1])
def test_too_small_vocab_is_rejected(vocab_size):
    with pytest.raises(ValueError, match=r"vocab_size=\d+ is too small"):
        train_tokenizer(CORPUS, vocab_size)


def test_bad_texts_are_rejected():
    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer("just one string", 320)
    with pytest.raises(TypeError, match=r"texts\[1\] is a bytes"):
        train_tokenizer(["ok", b"bytes"], 320)


def test_save_writes_all_files(saved_dir):
    written = sorted(p.name for p in saved_dir.iterdir())
    assert written == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert set(written) <= set(TOKENIZER_FILES), "checkpoints and exports must carry every file"
    config = json.loads((saved_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["model_max_length"] == 512
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert config[key] == EOS_TOKEN


def test_load_round_trip(tok, saved_dir):
    loaded = load_tokenizer(saved_dir)
    assert loaded.to_str() == tok.to_str()


def test_load_missing_dir_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)


def test_load_corrupt_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path)


def test_eos_id_requires_eos():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="has no <\\|endoftext\\|> token"):
        eos_id(Tokenizer(models.BPE()))


def test_auto_tokenizer_special_tokens(hf_tok):
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == hf_tok.unk_token == EOS_TOKEN
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == 0
    assert hf_tok.model_max_length == 512


@pytest.mark.parametrize("text", SAMPLES)
def test_auto_tokenizer_matches_ours(tok, hf_tok, text):
    ids = tok.encode(text).ids
    assert hf_tok.encode(text) == ids
    assert hf_tok.decode(ids) == tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_jinja(hf_tok, messages, add_generation_prompt):
    ours = apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_chat_template_format(tok):
    text = apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|system|>\nS<|endoftext|>\n<|user|>\nU<|endoftext|>\n<|assistant|>\n"
    ids = tok.encode(text).ids
    # The role markers and EOS are single special tokens, not spelled out byte by byte.
    assert ids[0] == tok.token_to_id("<|system|>") and ids[-2] == tok.token_to_id("<|assistant|>")


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ([{"role": "tool", "content": "x"}], ValueError, "unknown chat role 'tool'"),
        ([{"content": "x"}], ValueError, "must be a dict with 'role' and 'content'"),
        ([{"role": "user", "content": None}], ValueError, r"\['content'\] must be a string"),
        ("hello", TypeError, "messages must be a list"),
        ([], ValueError, "messages is empty"),
    ],
)
def test_chat_template_bad_messages(messages, error, match):
    with pytest.raises(error, match=match):
        apply_chat_template(messages)


def test_jinja_rejects_unknown_role(hf_tok):
    """The template's own raise_exception, as transformers runs it (jinja2's TemplateError), naming the role."""
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=r"^unknown chat role tool; expected system, user or assistant$"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
