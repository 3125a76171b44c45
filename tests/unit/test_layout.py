"""Parallel layout: rank coordinates, group membership, validation messages and the elastic planner."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from moe_platform.config.schema import ParallelConfig
from moe_platform.model.args import ModelArgs
from moe_platform.parallel.layout import (
    GROUP_KINDS,
    Layout,
    RankCoords,
    build_process_groups,
    plan_layout,
    plan_layout_with_reason,
    valid_layouts,
    validate_layout,
)

MODEL = ModelArgs(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=128, num_experts=8, vocab_size=512)
GBS, MBS = 16, 2  # 8 micro batches: dp 1, 2, 4 and 8 all divide it

LAYOUTS = [
    Layout(),
    Layout(dp=8),
    Layout(dp=8, ep=8),
    Layout(dp=8, ep=2),
    Layout(dp=2, tp=2, pp=2, ep=2),
    Layout(dp=4, tp=2, ep=2),
    Layout(dp=2, pp=4, ep=1),
    Layout(dp=6, tp=2, pp=2, ep=3),
    Layout(tp=4, pp=2),
]


# ---- Layout object -------------------------------------------------------------------------------------------
def test_properties_and_str():
    x = Layout(dp=4, tp=2, pp=3, ep=2)
    assert x.world_size == 24 and x.edp == 2
    assert (x.dp_enabled, x.tp_enabled, x.pp_enabled, x.ep_enabled) == (True, True, True, True)
    assert not any((Layout().dp_enabled, Layout().tp_enabled, Layout().pp_enabled, Layout().ep_enabled))
    assert str(x) == "dp4·tp2·pp3·ep2"
    assert Layout.parse(str(x)) == x
    assert Layout.parse("dp2 pp2") == Layout(dp=2, pp=2)
    assert Layout.from_dict(x.to_dict()) == x
    assert x.to_dict() == {"dp": 4, "tp": 2, "pp": 3, "ep": 2}
    assert x.num_micro_batches(16, 2) == 2


@pytest.mark.parametrize("bad", [{"dp": 0}, {"tp": -1}, {"pp": 1.5}, {"ep": True}])
def test_degrees_must_be_positive_ints(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"Layout.{name} must be a positive int"):
        Layout(**bad)


def test_bad_dict_and_text():
    with pytest.raises(ValueError, match=r"unknown layout keys \['cp'\]"):
        Layout.from_dict({"dp": 2, "cp": 2})
    with pytest.raises(ValueError, match="cannot parse layout"):
        Layout.parse("dp2·zz3")
    with pytest.raises(ValueError, match="unknown group kind"):
        Layout().all_groups("sp")


def test_mapping_requires_ep_to_divide_dp():
    with pytest.raises(ValueError, match=r"ep \(3\) must divide dp \(4\)"):
        Layout(dp=4, ep=3).coords(0)


# ---- rank mapping table --------------------------------------------------------------------------------------
# world 8, dp2·tp2·pp2·ep2: rank = (pp*dp + dp_index)*tp + tp_index
COORDS_8 = [
    RankCoords(dp=0, tp=0, pp=0, ep=0, edp=0),
    RankCoords(dp=0, tp=1, pp=0, ep=0, edp=0),
    RankCoords(dp=1, tp=0, pp=0, ep=1, edp=0),
    RankCoords(dp=1, tp=1, pp=0, ep=1, edp=0),
    RankCoords(dp=0, tp=0, pp=1, ep=0, edp=0),
    RankCoords(dp=0, tp=1, pp=1, ep=0, edp=0),
    RankCoords(dp=1, tp=0, pp=1, ep=1, edp=0),
    RankCoords(dp=1, tp=1, pp=1, ep=1, edp=0),
]


def test_coords_world8():
    x = Layout(dp=2, tp=2, pp=2, ep=2)
    assert [x.coords(r) for r in range(8)] == COORDS_8
    with pytest.raises(ValueError, match="rank 8 out of range"):
        x.coords(8)


GROUP_TABLE = [
    (Layout(dp=2, tp=2, pp=2, ep=2), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "edp": [[r] for r in range(8)],
    }),
    (Layout(dp=8, ep=2), {
        "tp": [[r] for r in range(8)],
        "dp": [list(range(8))],
        "pp": [[r] for r in range(8)],
        "ep": [[0, 1], [2, 3], [4, 5], [6, 7]],  # DeepSpeed: consecutive data-parallel ranks share the experts
        "edp": [[0, 2, 4, 6], [1, 3, 5, 7]],
    }),
    (Layout(dp=4, tp=2, ep=2), {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "pp": [[r] for r in range(8)],
        "ep": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "edp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    }),
    (Layout(dp=2, pp=4), {
        "tp": [[r] for r in range(8)],
        "dp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "pp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "ep": [[r] for r in range(8)],
        "edp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    }),
]


@pytest.mark.parametrize(("layout", "expected"), GROUP_TABLE, ids=lambda v: str(v) if isinstance(v, Layout) else "")
def test_group_table(layout, expected):
    for kind in GROUP_KINDS:
        assert layout.all_groups(kind) == expected[kind], kind


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_group_invariants(layout):
    world = layout.world_size
    for kind in GROUP_KINDS:
        groups = layout.all_groups(kind)
        members = sorted(itertools.chain.from_iterable(groups))
        assert members == list(range(world)), f"{kind}: every rank exactly once"
        assert all(len(g) == layout.size(kind) for g in groups)
        assert len(groups) == world // layout.size(kind)
        for g in groups:
            for position, r in enumerate(g):
                assert layout.group_ranks(kind, r) == g  # every member sees the same group
                assert getattr(layout.coords(r), kind) == position, (kind, r)  # group order = index order
    for r in range(world):
        c = layout.coords(r)
        assert layout.rank_of(c.dp, c.tp, c.pp) == r
        tp = layout.tp_group_ranks(r)
        assert tp == list(range(tp[0], tp[0] + layout.tp)), "tp groups are consecutive ranks"
        stage = set(range(c.pp * layout.dp * layout.tp, (c.pp + 1) * layout.dp * layout.tp))
        assert set(layout.dp_group_ranks(r)) <= stage and set(layout.ep_group_ranks(r)) <= stage
        assert [layout.coords(p).pp for p in layout.pp_group_ranks(r)] == list(range(layout.pp))
        assert set(layout.ep_group_ranks(r)) <= set(layout.dp_group_ranks(r))
        assert set(layout.edp_group_ranks(r)) <= set(layout.dp_group_ranks(r))
        assert set(layout.ep_group_ranks(r)) & set(layout.edp_group_ranks(r)) == {r}


# ---- validation ----------------------------------------------------------------------------------------------
def _margs(**kw) -> ModelArgs:
    base = MODEL.to_dict()
    base.update(kw)
    return ModelArgs(**base)


VALIDATION_ERRORS = [
    # (layout, world, model, gbs, mbs, vocab_parallel, message fragment)
    (Layout(dp=2), 4, MODEL, GBS, MBS, False, r"world size 4 != dp\*tp\*pp = 2\*1\*1 = 2"),
    (Layout(tp=2, dp=2), 4, _margs(n_heads=6, n_kv_heads=3, dim=48), GBS, MBS, False,
     r"model.n_kv_heads \(3\) must be divisible by tp \(2\)"),
    (Layout(tp=4), 4, _margs(n_heads=6, n_kv_heads=2, dim=48), GBS, MBS, False,
     r"model.n_heads \(6\) must be divisible by tp \(4\)"),
    (Layout(tp=4), 4, _margs(intermediate_size=130), GBS, MBS, False,
     r"model.intermediate_size \(130\) must be divisible by tp \(4\)"),
    (Layout(tp=4), 4, _margs(n_shared_experts=1, shared_intermediate_size=66), GBS, MBS, False,
     r"shared expert hidden size \(66\) must be divisible by tp \(4\)"),
    (Layout(tp=4), 4, _margs(vocab_size=510), GBS, MBS, True,
     r"model.vocab_size \(510\) must be divisible by tp \(4\)"),
    (Layout(tp=4), 4, _margs(vocab_size=0), GBS, MBS, True, r"model.vocab_size must be resolved"),
    (Layout(dp=4, ep=4), 4, _margs(num_experts=6), GBS, MBS, False,
     r"model.num_experts \(6\) must be divisible by ep \(4\)"),
    (Layout(dp=4, ep=8), 4, MODEL, GBS, MBS, False, r"ep \(8\) must divide dp \(4\)"),
    (Layout(pp=4), 4, _margs(n_layers=3), GBS, MBS, False, r"model.n_layers \(3\) must be >= pp \(4\)"),
    (Layout(dp=4), 4, MODEL, 12, 2, False,
     r"global_batch_size \(12\) must be divisible by dp\*micro_batch_size \(4\*2 = 8\)"),
    (Layout(dp=2, pp=2), 4, MODEL, 2, 2, False, r"pipeline parallelism needs >= 1 micro batch per data-parallel rank"),
    (Layout(), 1, MODEL, 0, 2, False, r"must be >= 1"),
]


@pytest.mark.parametrize(("layout", "world", "margs", "gbs", "mbs", "vocab_parallel", "match"), VALIDATION_ERRORS)
def test_validation_errors(layout, world, margs, gbs, mbs, vocab_parallel, match):
    with pytest.raises(ValueError, match=match):
        validate_layout(layout, world, margs, gbs, mbs, vocab_parallel=vocab_parallel)


def test_vocab_not_checked_without_vocab_parallel():
    validate_layout(Layout(tp=4), 4, _margs(vocab_size=510), GBS, MBS)


def test_error_names_every_violation_and_lists_valid_layouts():
    with pytest.raises(ValueError) as info:
        validate_layout(Layout(dp=2, tp=3, ep=4), 4, _margs(num_experts=6), 16, 2)
    msg = str(info.value)
    assert "invalid parallel layout dp2·tp3·pp1·ep4 for world size 4" in msg
    for fragment in ("world size 4 != dp*tp*pp", "n_heads (8) must be divisible by tp (3)",
                     "num_experts (6) must be divisible by ep (4)", "ep (4) must divide dp (2)"):
        assert fragment in msg
    listed = msg.split("valid layouts for world size 4: ")[1].split(", ")
    assert listed == [str(x) for x in valid_layouts(4, _margs(num_experts=6), 16, 2)]
    assert listed[0] == "dp4·tp1·pp1·ep2"  # num_experts 6: ep 2 is the largest dividing both


def test_pipeline_with_few_micro_batches_warns_not_fails(caplog):
    with caplog.at_level(logging.WARNING):
        warnings = validate_layout(Layout(dp=2, pp=4), 8, MODEL, 8, 2)
    assert len(warnings) == 1 and "1F1B" in warnings[0] and "< pp (4)" in warnings[0]
    assert "1F1B" in caplog.text
    assert validate_layout(Layout(dp=2, pp=2), 4, MODEL, 8, 2) == []


def test_valid_layouts_world4():
    got = {str(x) for x in valid_layouts(4, MODEL, GBS, MBS)}
    assert got == {
        "dp4·tp1·pp1·ep1", "dp4·tp1·pp1·ep2", "dp4·tp1·pp1·ep4",
        "dp2·tp1·pp2·ep1", "dp2·tp1·pp2·ep2", "dp2·tp2·pp1·ep1", "dp2·tp2·pp1·ep2",
        "dp1·tp1·pp4·ep1", "dp1·tp2·pp2·ep1", "dp1·tp4·pp1·ep1",
    }
    assert str(valid_layouts(4, MODEL, GBS, MBS)[0]) == "dp4·tp1·pp1·ep4"


# ---- planning ------------------------------------------------------------------------------------------------
def P(**kw) -> ParallelConfig:
    return ParallelConfig(**kw)


PLAN_TABLE = [
    # (world, parallel config, expected layout)
    *[(w, P(), f"dp{w}·tp1·pp1·ep1") for w in (1, 2, 4, 8)],  # defaults dp1 tp1 pp1 ep1: grow dp only
    (3, P(), "dp1·tp1·pp3·ep1"),  # gbs 16 / mbs 2 = 8 micro batches: dp 3 impossible, tp 3 breaks heads
    (6, P(), "dp2·tp1·pp3·ep1"),
    *[(w, P(dp=0, tp=0, pp=0, ep=0), f"dp{w}·tp1·pp1·ep{w}") for w in (1, 2, 4, 8)],
    (4, P(dp=2, pp=2), "dp2·tp1·pp2·ep1"),  # fits: kept
    (2, P(dp=2, pp=2), "dp1·tp1·pp2·ep1"),  # elastic shrink: keep tp and pp, shrink dp
    (8, P(dp=2, pp=2), "dp4·tp1·pp2·ep1"),  # elastic grow: keep tp and pp, grow dp
    (1, P(dp=2, pp=2), "dp1·tp1·pp1·ep1"),  # pp2 cannot fit one rank
    (4, P(dp=4, ep=4), "dp4·tp1·pp1·ep4"),
    (2, P(dp=4, ep=4), "dp2·tp1·pp1·ep2"),  # ep must shrink with dp: largest ep below the configured one
    (8, P(dp=4, ep=4), "dp8·tp1·pp1·ep4"),  # keeps ep, grows dp
    (8, P(dp=0, tp=2, pp=1, ep=0), "dp4·tp2·pp1·ep4"),
    (8, P(dp=0, tp=2, pp=0, ep=1), "dp4·tp2·pp1·ep1"),
    (4, P(dp=0, tp=8, pp=1, ep=1), "dp4·tp1·pp1·ep1"),  # tp8 cannot fit; tp <= configured preferred, larger dp
]


@pytest.mark.parametrize(("world", "cfg", "expected"), PLAN_TABLE,
                         ids=lambda v: str(v) if isinstance(v, (int, str)) else "")
def test_plan_table(world, cfg, expected):
    layout = plan_layout(world, MODEL, cfg, GBS, MBS)
    assert str(layout) == expected
    validate_layout(layout, world, MODEL, GBS, MBS)


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("cfg", [P(), P(dp=0, tp=0, pp=0, ep=0), P(dp=2, pp=2), P(tp=2, dp=0), P(dp=0, ep=0)],
                         ids=lambda c: f"dp{c.dp}tp{c.tp}pp{c.pp}ep{c.ep}")
def test_plan_world_1_to_8_is_valid_and_deterministic(world, cfg):
    margs = _margs(n_layers=8)  # 8 layers: pp can absorb the prime world sizes 5 and 7
    layout = plan_layout(world, margs, cfg, 48, 1)
    validate_layout(layout, world, margs, 48, 1)
    assert plan_layout(world, margs, cfg, 48, 1) == layout  # deterministic


def test_plan_no_valid_layout():
    with pytest.raises(ValueError, match="no valid parallel layout for world size 5") as info:
        plan_layout(5, MODEL, P(dp=0, tp=0, pp=0, ep=0), GBS, MBS)
    msg = str(info.value)
    assert "dp5·tp1·pp1·ep1: train.global_batch_size (16) must be divisible" in msg
    assert "dp1·tp1·pp5·ep1: model.n_layers (4) must be >= pp (5)" in msg
    assert "dp1·tp5·pp1·ep1: model.n_heads (8) must be divisible by tp (5)" in msg


def test_plan_reason_and_log(caplog):
    layout, reason = plan_layout_with_reason(2, MODEL, P(dp=2, pp=2), GBS, MBS)
    assert str(layout) == "dp1·tp1·pp2·ep1"
    assert "configured dp2·tp1·pp2·ep1 does not fit world size 2" in reason and "kept tp1·pp2·ep1" in reason
    with caplog.at_level(logging.INFO, logger="moe_platform.parallel.layout"):
        plan_layout(2, MODEL, P(dp=2, pp=2), GBS, MBS)
        plan_layout(4, MODEL, P(dp=2, pp=2), GBS, MBS)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == logging.WARNING and "does not fit" in levels[0][1]
    assert levels[1] == (logging.INFO, "layout dp2·tp1·pp2·ep1 for world size 4: kept the configured dp2·tp1·pp2·ep1")


@pytest.mark.parametrize(("kw", "match"), [
    ({"dp": -1}, r"parallel.dp must be an int >= 0"),
])
def test_plan_rejects_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_layout(4, MODEL, P(**kw), GBS, MBS)


@pytest.mark.parametrize(("world", "gbs", "mbs", "match"), [
    (0, 16, 2, "world size must be a positive int"),
    (4, 16, 0, r"micro_batch_size \(0\) must be >= 1"),
])
def test_plan_rejects_bad_inputs(world, gbs, mbs, match):
    with pytest.raises(ValueError, match=match):
        plan_layout(world, MODEL, P(), gbs, mbs)


@st.composite
def _planning_case(draw):
    n_kv = draw(st.sampled_from([1, 2, 3, 4]))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 4]))
    margs = ModelArgs(
        dim=n_heads * 8, n_heads=n_heads, n_kv_heads=n_kv, n_layers=draw(st.integers(1, 6)),
        intermediate_size=draw(st.sampled_from([8, 12, 16, 30])), num_experts=draw(st.integers(2, 12)), top_k=1,
        n_shared_experts=draw(st.integers(0, 1)), shared_intermediate_size=draw(st.sampled_from([0, 6, 8])),
        vocab_size=draw(st.sampled_from([0, 96, 100])),
    )
    cfg = ParallelConfig(**{k: draw(st.integers(0, 6)) for k in ("dp", "tp", "pp", "ep")})
    return (draw(st.integers(1, 12)), margs, cfg, draw(st.integers(1, 48)), draw(st.integers(1, 6)),
            draw(st.booleans()))


def _check_plan(case) -> str:
    """Plan one case and check the result; return the branch it took: 'none valid' (an error listing why), 'kept'
    (every configured degree kept, as some valid layout has them all) or 'relaxed' (none has them all: the planner
    kept the most it could, in its documented order)."""
    world, margs, cfg, gbs, mbs, vocab_parallel = case
    valid = valid_layouts(world, margs, gbs, mbs, vocab_parallel)
    try:
        layout = plan_layout(world, margs, cfg, gbs, mbs, vocab_parallel)
    except ValueError as e:
        assert "no valid parallel layout" in str(e)
        assert valid == []
        return "none valid"
    validate_layout(layout, world, margs, gbs, mbs, vocab_parallel)
    assert layout in valid
    fixed = {k: getattr(cfg, k) for k in ("dp", "tp", "pp", "ep") if getattr(cfg, k)}
    # relaxation order: all configured degrees; tp, pp and ep (dp resized); tp and pp; nothing
    steps = [set(fixed), {"tp", "pp", "ep"} & set(fixed), {"tp", "pp"} & set(fixed), set()]
    keep = next(k for k in steps if any(all(getattr(x, d) == fixed[d] for d in k) for x in valid))
    assert all(getattr(layout, d) == fixed[d] for d in keep), (layout, fixed, keep)
    if keep == set(fixed):
        return "kept"
    assert any(getattr(layout, d) != v for d, v in fixed.items())
    return "relaxed"


def test_plan_always_validates_or_raises():
    seen: dict[str, int] = {}

    @settings(max_examples=150, deadline=None)
    @given(_planning_case())
    # one sure case of each branch, so that every run checks all three whatever the random cases are
    @example((1, MODEL, ParallelConfig(), 3, 2, False))  # 3 sequences do not split into micro-batches of 2
    @example((4, MODEL, ParallelConfig(dp=2, pp=2), GBS, MBS, False))
    @example((2, MODEL, ParallelConfig(dp=2, pp=2), GBS, MBS, False))  # an elastic shrink: dp gives way
    def check(case):
        branch = _check_plan(case)
        seen[branch] = seen.get(branch, 0) + 1

    check()
    assert set(seen) == {"none valid", "kept", "relaxed"}, seen


# ---- process groups without a process group ------------------------------------------------------------------
def test_build_process_groups_needs_initialised_torch_distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        build_process_groups(Layout(), 0)
