"""Request hardening of the Serve app over real HTTP, one Ray/Serve instance for the module: every number a request
carries is bounded (extreme values, NaN/Infinity tokens and wrong types get a 400 naming the field, or a 200 where the
value is legitimately clamped), and the server answers normally right after each; a 1 MB prompt is refused by its
length in characters; stop strings and X-Session-Id are bounded; /v1/models and the admin routes show no server
paths."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from moe_platform.serving.sampling import MAX_STOP_CHARS
from moe_platform.serving.traffic import MAX_SESSION_ID_CHARS
from tinyrun import local_ray

pytestmark = pytest.mark.timeout(600)

MODEL = "moe-platform"
ADMIN_KEY = "admin-key-hardening"
ERROR_KEYS = {"message", "type", "param", "code"}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(serving_export, serving_port):
    from ray import serve

    from moe_platform.serving.app import start_server

    with local_ray(num_cpus=4):
        try:
            url = start_server(serving_export, port=serving_port, admin_api_key=ADMIN_KEY,
                               engine={"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "max_loras": 1,
                                       "max_lora_rank": 8})
            with httpx.Client(base_url=url, timeout=60) as http:
                yield SimpleNamespace(url=url, http=http)
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def adapter_dirs(serving_export, serving_export_b, tmp_path_factory):
    """An adapter of serving_export ('a') and one of serving_export_b ('other', another base model)."""
    from moe_platform.checkpoint.hf import load_hf
    from tinyrun import random_adapter

    made = {}
    for name, base in (("a", serving_export), ("other", serving_export_b)):
        args, state = load_hf(base)
        made[name] = random_adapter(args, state, ("q_proj", "v_proj"), 4, len(made) + 1,
                                    tmp_path_factory.mktemp(f"adapter_{name}"), base)[0]
    return made


def post(server, endpoint: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.http.post(f"/v1/{endpoint}", content=content,
                            headers={"content-type": "application/json", **(headers or {})})


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"]
    return err


def names(err: dict, field: str) -> bool:
    param = err["param"] or ""
    return param == field or param.startswith((f"{field}.", f"{field}["))


INTS = [2**31 - 1, 2**31, 2**63 - 1, 2**63, -2**63 - 1, 10**30]
FLOATS = [1e308, -1e308, 2**63, -(10**30)]
WRONG = ["5", [5], {"v": 5}, True]
# (field, value) pairs a request may legitimately carry: top_k above the vocabulary is no filter (clamped); seeds
# are [0, 2**63).
ACCEPTED = {("top_k", 2**31 - 1), ("seed", 2**31 - 1), ("seed", 2**31), ("seed", 2**63 - 1)}


def _cases():
    for endpoint, base, ints, floats, extra in (
            ("completions", COMPLETION, ["max_tokens", "n", "top_k", "seed", "logprobs", "best_of"],
             ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"], {}),
            ("chat/completions", CHAT, ["max_tokens", "max_completion_tokens", "top_logprobs", "n"], ["temperature"],
             {"logprobs": True})):
        for field in ints:
            for value in [*INTS, *WRONG, 2.0]:
                exact_int = isinstance(value, int) and not isinstance(value, bool)
                yield endpoint, {**base, **extra, field: value}, field, exact_int and (field, value) in ACCEPTED
        for field in floats:
            for value in [*FLOATS, *WRONG]:
                yield endpoint, {**base, field: value}, field, False
    for value in (1, "true", [True]):
        yield "chat/completions", {**CHAT, "logprobs": value}, "logprobs", False
    yield "completions", {**COMPLETION, "top_k": 600}, "top_k", True  # above the vocabulary (512): no filter
    yield "completions", {**COMPLETION, "n": None}, "n", False
    for bias in ({"1": 1e308}, {"1": -1e308}, {"abc": 1}, {"1": "x"}, {str(2**63): 1}, [1], 5, {"1": 5}):
        yield "completions", {**COMPLETION, "logit_bias": bias}, "logit_bias", False
    for ids in ([2**63], [-1], [2**31], [600], [[1, 2**63]]):
        yield "completions", {**COMPLETION, "prompt": ids}, "prompt", False
    # Python's json reads NaN, Infinity and 1e400 (infinity); strict JSON has none of them.
    raw = json.dumps(COMPLETION)[:-1]
    for field, token in (("temperature", "NaN"), ("top_p", "Infinity"), ("top_k", "-Infinity"), ("max_tokens", "NaN"),
                         ("temperature", "1e400"), ("presence_penalty", "-1e400"), ("seed", "1e400"),
                         ("n", "Infinity")):
        yield "completions", f'{raw}, "{field}": {token}}}'.encode(), field, False
    yield "chat/completions", f'{json.dumps(CHAT)[:-1]}, "max_completion_tokens": NaN}}'.encode(), \
        "max_completion_tokens", False


CASES = list(_cases())


@pytest.mark.parametrize("endpoint, body, field, accepted", CASES,
                         ids=[f"{e}-{f}-{i}" for i, (e, _, f, _) in enumerate(CASES)])
def test_extreme_values_are_a_400_naming_the_field_and_the_server_goes_on(server, endpoint, body, field, accepted):
    r = post(server, endpoint, body)
    assert r.status_code < 500, r.text
    if accepted:
        assert r.status_code == 200, r.text
        assert r.json()["choices"]
    else:
        err = openai_error(r, 400)
        assert names(err, field), err
    normal = post(server, "completions", {**COMPLETION, "max_tokens": 1})
    assert normal.status_code == 200, normal.text


def test_a_1_mb_prompt_is_refused_by_its_length_in_characters(server):
    for endpoint, body, field in (("completions", {**COMPLETION, "prompt": "x" * 1_000_000}, "prompt"),
                                  ("completions", {**COMPLETION, "prompt": ["hi", "word " * 200_000]}, "prompt"),
                                  ("chat/completions", {**CHAT, "messages": [{"role": "user",
                                                                              "content": "x" * 1_000_000}]},
                                   "messages")):
        err = openai_error(post(server, endpoint, body), 400)
        assert err["param"] == field and err["code"] == "context_length_exceeded", err
        assert "characters" in err["message"] and "context window" in err["message"], err
    assert post(server, "completions", COMPLETION).status_code == 200


def test_stop_strings_are_bounded_in_length(server):
    err = openai_error(post(server, "completions", {**COMPLETION, "stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}), 400)
    assert err["param"] == "stop" and str(MAX_STOP_CHARS) in err["message"]
    openai_error(post(server, "chat/completions", {**CHAT, "stop": "y" * (MAX_STOP_CHARS + 1)}), 400)
    assert post(server, "completions", {**COMPLETION, "stop": ["x" * MAX_STOP_CHARS, "\n"]}).status_code == 200


def test_the_session_header_is_bounded(server):
    ok = "s" * MAX_SESSION_ID_CHARS
    assert post(server, "completions", COMPLETION, {"X-Session-Id": ok}).status_code == 200
    err = openai_error(post(server, "completions", COMPLETION, {"X-Session-Id": ok + "s"}), 400)
    assert err["param"] == "X-Session-Id" and err["code"] == "invalid_session_id", err
    assert ok not in err["message"]


def test_models_and_admin_answers_show_no_server_paths(server, adapter_dirs, tmp_path):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = post(server, "load_lora_adapter", {"lora_name": "a", "lora_path": str(adapter_dirs["a"])}, admin)
    assert r.status_code == 200, r.text
    assert r.json()["root"] == "a" and str(adapter_dirs["a"]) not in r.text
    models = server.http.get("/v1/models")
    assert models.status_code == 200
    assert [(m["id"], m["root"], m["parent"]) for m in models.json()["data"]] == \
        [(MODEL, MODEL, None), (f"{MODEL}:a", "a", MODEL)]
    assert str(adapter_dirs["a"]) not in models.text and "/" not in models.text

    # A directory that is missing, one that exists but holds no adapter, and a relative path out of the app's
    # directory get one answer: neither the resolved path nor whether anything is there.
    (tmp_path / "empty").mkdir()
    answers = []
    for path in ("/nonexistent/adapter", str(tmp_path / "empty"), "../../../etc"):
        r = post(server, "load_lora_adapter", {"lora_name": "x", "lora_path": path}, admin)
        err = openai_error(r, 400)
        assert err["param"] == "lora_path" and err["code"] == "invalid_adapter", err
        assert path not in r.text and str(tmp_path) not in r.text and "exist" not in r.text.lower(), r.text
        answers.append(err["message"])
    assert len(set(answers)) == 1 and "adapter 'x' could not be loaded" in answers[0]
    r = post(server, "load_lora_adapter", {"lora_name": "x", "lora_path": str(adapter_dirs["other"])}, admin)
    err = openai_error(r, 400)
    assert err["code"] == "adapter_base_mismatch" and "trained on a different base model" in err["message"]
    assert str(adapter_dirs["other"]) not in r.text

    probe = tmp_path / "missing-probe.txt"
    r = server.http.post("/admin/rollout", json={"action": "start", "to": "v2", "source": str(tmp_path),
                                                 "gates": {"quality": {"file": str(probe)}}}, headers=admin)
    err = openai_error(r, 400)
    assert "gates.quality.file" in err["message"] and str(tmp_path) not in r.text, r.text
    assert post(server, "completions", {**COMPLETION, "model": f"{MODEL}:a"}).status_code == 200
