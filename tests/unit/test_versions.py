"""The versions one replica serves (`VersionSet`), without Ray or Serve: picking a request's version by pin,
session and split; the hot swap of the main version's model with its adapters; a version loaded in the background,
and one that fails to load reported without a server path; quality-probe scoring."""

from __future__ import annotations

import pytest

from moe_platform.checkpoint.hf import export_hf, load_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.engine import SamplingParams
from moe_platform.serving.errors import NotFoundError
from moe_platform.serving.versions import VersionSet
from moe_platform.tokenizer import save_tokenizer, train_tokenizer
from tinyrun import corpus_text, poll, random_adapter

OPTIONS = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "max_loras": 2, "max_lora_rank": 8}
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two versions of one tiny architecture (different weights, the same tokenizer), a second export of the first
    (a rebuild of the same weights elsewhere), and an adapter on the first."""
    text = corpus_text(60_000)
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 384)
    tok_dir = save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=128)
    args = ModelArgs(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                     intermediate_size=64, num_experts=4, top_k=2, max_seq_len=128, init_std=0.1)
    dirs = {name: export_hf(build_model(args, seed=seed).state_dict(), args, tmp_path_factory.mktemp(name),
                            tokenizer_dir=tok_dir) for name, seed in (("v1", 0), ("v2", 1), ("v1-again", 0))}
    a_args, state = load_hf(dirs["v1"])
    dirs["adapter"] = random_adapter(a_args, state, ("q_proj", "v_proj"), 4, 1, tmp_path_factory.mktemp("ad"),
                                     dirs["v1"])[0]
    return dirs


@pytest.fixture()
def versions(exports, tmp_path):
    vs = VersionSet(str(exports["v1"]), OPTIONS, tmp_path, version="stable", versions={"canary": str(exports["v2"])},
                    traffic={"stable": 50, "canary": 50}, adapters={"ad": str(exports["adapter"])})
    yield vs
    vs.shutdown()


def test_a_request_goes_to_its_pin_its_session_or_the_split(versions):
    assert versions.pick("canary", None, None) == (versions.others["canary"], "canary")
    assert versions.pick(None, None, "ad")[1] == "stable"  # adapters live on the main version's engine
    chosen = {versions.pick(None, f"user-{i}", None)[1] for i in range(40)}
    assert chosen == {"stable", "canary"}  # 50/50 over 40 sessions
    for i in range(5):
        first = versions.pick(None, f"sticky-{i}", None)[1]
        assert all(versions.pick(None, f"sticky-{i}", None)[1] == first for _ in range(5))
    with pytest.raises(NotFoundError, match="'nope' does not exist.*\\['canary', 'stable'\\]"):
        versions.pick("nope", None, None)


def test_report_names_each_versions_state_and_source(versions, exports):
    report = versions.report()
    assert set(report) == {"stable", "canary"} and all(r["ready"] for r in report.values())
    assert report["canary"]["source"] == str(exports["v2"])
    assert report["stable"]["base"] == report["canary"]["base"]  # one architecture and tokenizer: may share traffic


def test_swap_moves_the_adapters_and_the_old_engine_finishes_its_requests(versions, exports):
    old = versions.engine
    outs = []
    running = old.add_request("ROMEO:", GREEDY, sink=outs.append)
    versions.swap_engine(str(exports["v1-again"]))
    new = versions.engine
    assert new is not old and new.model_dir == str(exports["v1-again"].resolve())
    assert [a["name"] for a in new.loaded_adapters()] == ["ad"]  # the same base weights: the adapter moved along
    poll(lambda: not old.has_unfinished(), 60, "the old engine to finish its request")
    poll(lambda: not old.running, 60, "the old engine to stop")
    # The request stayed on the engine that took it, and finished there.
    assert {o.request_id for o in outs} == {running} and outs[-1].finished and outs[-1].finish_reason == "length"
    assert not new.has_unfinished()
    versions.swap_engine(str(exports["v1-again"]))  # the same model again: nothing happens
    assert versions.engine is new
    versions.swap_engine(str(exports["v2"]))  # another base model: the adapter does not fit it and is dropped
    assert versions.engine is not new and versions.engine.loaded_adapters() == []
    assert versions.adapters == {"ad": str(exports["adapter"])}  # still declared: a later swap back takes it


def test_a_version_loads_in_the_background_and_a_bad_one_reports_no_path(versions, exports, tmp_path):
    versions.start_loading("next", str(exports["v1"]))
    versions.start_loading("broken", str(tmp_path / "no-such-model"))
    poll(lambda: "next" in versions.others and versions.loading.get("broken"), 120, "both loads to end")
    assert versions.engines()["next"].generate("ROMEO:", GREEDY) == versions.engine.generate("ROMEO:", GREEDY)
    error = versions.report()["broken"]["error"]
    assert error.startswith("version 'broken' could not be loaded") and str(tmp_path) not in error
    assert versions.report()["broken"]["ready"] is False


def test_score_gives_each_named_version_its_loss(versions):
    losses = versions.score(["stable", "canary", "absent"], ["ROMEO: what light", "JULIET: it is the east"])
    assert set(losses) == {"stable", "canary"} and all(0 < v < 20 for v in losses.values())
    assert losses["stable"] != losses["canary"]  # different weights
