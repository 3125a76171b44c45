"""The parallel layout: how many ways the job is split along data (dp), tensor (tp), pipeline (pp) and expert (ep) axes.

One `Layout` owns the four degrees, maps global ranks to coordinates and lists the ranks of every process group.
Everything that checks whether a layout fits a model, a world size and a batch lives in `validate_layout`, and
`plan_layout` picks a layout for the world size a (possibly resized) job actually got.

Rank mapping (Megatron-LM's order, tp fastest, then dp, then pp outermost)::

    rank = (pp_index * dp + dp_index) * tp + tp_index

so consecutive ranks form a tensor-parallel group (TP all-reduces every layer, so its members should share a node) and a
pipeline stage is a contiguous block of dp*tp ranks. Expert parallelism does not add ranks: like DeepSpeed-MoE and
Megatron, the experts of a layer are sharded over `ep` of the data-parallel ranks of a stage, so for a data-parallel
index d the expert-parallel index is ``d % ep`` and the expert-data-parallel index is ``d // ep``. An expert-parallel
group is ep consecutive dp indices (same pp, tp and edp index); the replicas of one expert shard form an
expert-data-parallel group of dp // ep ranks (same pp, tp and ep index), over which expert gradients are averaged.

Example, world 8 as dp2·tp2·pp2·ep2: tp groups [0,1] [2,3] [4,5] [6,7]; dp groups [0,2] [1,3] [4,6] [5,7];
pp groups [0,4] [1,5] [2,6] [3,7]; ep groups equal the dp groups; edp groups are single ranks.

Nothing here imports torch at module level: planning runs in drivers and tests without a process group.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_platform.config.schema import ParallelConfig
    from moe_platform.model.args import ModelArgs

logger = logging.getLogger(__name__)

DEGREES = ("dp", "tp", "pp", "ep")
GROUP_KINDS = ("tp", "dp", "pp", "ep", "edp")  # also the global order in which process groups are created
_MAX_LISTED = 24  # valid layouts named in one error message


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits: its index inside each kind of group."""

    dp: int
    tp: int
    pp: int
    ep: int
    edp: int


@dataclass(frozen=True)
class Layout:
    """Degrees of data, tensor, pipeline and expert parallelism; world_size = dp * tp * pp (ep is carved out of dp)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in DEGREES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name} must be a positive int, got {value!r}")

    # ---- degrees ---------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: how many ranks hold a replica of the same expert shard."""
        self._require_ep_divides_dp()
        return self.dp // self.ep

    # Whether a dimension is split at all: code asks these (`layout.tp_enabled`), never the raw degrees.
    dp_enabled = property(lambda self: self.dp > 1)
    tp_enabled = property(lambda self: self.tp > 1)
    pp_enabled = property(lambda self: self.pp > 1)
    ep_enabled = property(lambda self: self.ep > 1)

    def size(self, kind: str) -> int:
        """Number of ranks in one group of `kind` (one of GROUP_KINDS)."""
        _check_kind(kind)
        return self.edp if kind == "edp" else getattr(self, kind)

    def num_micro_batches(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro batches each data-parallel rank runs per optimizer step (gradient accumulation / pipeline depth)."""
        if micro_batch_size < 1 or global_batch_size % (self.dp * micro_batch_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a whole number of micro batches of "
                f"{micro_batch_size} on each of dp={self.dp} ranks"
            )
        return global_batch_size // (self.dp * micro_batch_size)

    # ---- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        unknown = sorted(set(d) - set(DEGREES))
        if unknown:
            raise ValueError(f"unknown layout keys {unknown}; known: {list(DEGREES)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Read "dp2·tp1·pp2·ep2" (separators ·, ., comma, x or spaces; a missing degree is 1)."""
        parts = [p for p in re.split(r"[·.,x\s]+", text.strip()) if p]
        degrees: dict[str, int] = {}
        for part in parts:
            m = re.fullmatch(r"(dp|tp|pp|ep)(\d+)", part)
            if m is None or m.group(1) in degrees:
                raise ValueError(f"cannot parse layout {text!r}: expected e.g. 'dp2·tp1·pp2·ep2', bad part {part!r}")
            degrees[m.group(1)] = int(m.group(2))
        if not degrees:
            raise ValueError(f"cannot parse layout {text!r}: expected e.g. 'dp2·tp1·pp2·ep2'")
        return cls(**degrees)

    def __str__(self) -> str:
        return f"dp{self.dp}·tp{self.tp}·pp{self.pp}·ep{self.ep}"

    # ---- rank mapping ----------------------------------------------------------------------------------------
    def rank_of(self, dp: int, tp: int, pp: int) -> int:
        """Global rank of the given data/tensor/pipeline indices (tp fastest, pp outermost)."""
        for name, index, size in (("dp", dp, self.dp), ("tp", tp, self.tp), ("pp", pp, self.pp)):
            if not 0 <= index < size:
                raise ValueError(f"{name} index {index} out of range for {self} (0..{size - 1})")
        return (pp * self.dp + dp) * self.tp + tp

    def coords(self, rank: int) -> RankCoords:
        self._require_ep_divides_dp()
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for {self} with world size {self.world_size}")
        tp = rank % self.tp
        dp = (rank // self.tp) % self.dp
        pp = rank // (self.tp * self.dp)
        return RankCoords(dp=dp, tp=tp, pp=pp, ep=dp % self.ep, edp=dp // self.ep)

    def tp_group_ranks(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank_of(c.dp, t, c.pp) for t in range(self.tp)]

    def dp_group_ranks(self, rank: int) -> list[int]:
        c = self.coords(rank)
        return [self.rank_of(d, c.tp, c.pp) for d in range(self.dp)]

    def pp_group_ranks(self, rank: int) -> list[int]:
        """The ranks holding the same dp/tp shard in every stage, in stage order (send/recv peers)."""
        c = self.coords(rank)
        return [self.rank_of(c.dp, c.tp, p) for p in range(self.pp)]

    def ep_group_ranks(self, rank: int) -> list[int]:
        """The ranks that together hold all experts: same pp, tp and edp index, ep consecutive dp indices."""
        c = self.coords(rank)
        first = c.edp * self.ep
        return [self.rank_of(first + e, c.tp, c.pp) for e in range(self.ep)]

    def edp_group_ranks(self, rank: int) -> list[int]:
        """The replicas of this rank's expert shard: same pp, tp and ep index (expert gradients reduce here)."""
        c = self.coords(rank)
        return [self.rank_of(r * self.ep + c.ep, c.tp, c.pp) for r in range(self.edp)]

    def group_ranks(self, kind: str, rank: int) -> list[int]:
        _check_kind(kind)
        return getattr(self, f"{kind}_group_ranks")(rank)

    def all_groups(self, kind: str) -> list[list[int]]:
        """Every group of `kind`, ordered by smallest member: the order all ranks must create them in."""
        _check_kind(kind)
        groups: list[list[int]] = []
        seen: set[int] = set()
        for rank in range(self.world_size):
            if rank not in seen:
                ranks = self.group_ranks(kind, rank)
                seen.update(ranks)
                groups.append(ranks)
        return groups

    def _require_ep_divides_dp(self) -> None:
        if self.dp % self.ep:
            raise ValueError(
                f"layout {self}: ep ({self.ep}) must divide dp ({self.dp}) because experts are sharded over "
                "data-parallel ranks"
            )


def _check_kind(kind: str) -> None:
    if kind not in GROUP_KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- validation ----------------------------------------------------------------------------------------------
def _layout_problems(
    layout: Layout,
    world_size: int,
    model_args: ModelArgs,
    global_batch_size: int,
    micro_batch_size: int,
    vocab_parallel: bool,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) of running `layout` on `world_size` ranks; every violated constraint is named."""
    errors: list[str] = []
    warnings: list[str] = []
    dp, tp, pp, ep = layout.dp, layout.tp, layout.pp, layout.ep
    if layout.world_size != world_size:
        errors.append(f"world size {world_size} != dp*tp*pp = {dp}*{tp}*{pp} = {layout.world_size}")
    m = model_args
    if m.n_heads % tp:
        errors.append(f"model.n_heads ({m.n_heads}) must be divisible by tp ({tp})")
    if m.kv_heads % tp:
        errors.append(f"model.n_kv_heads ({m.n_kv_heads}) must be divisible by tp ({tp})")
    if m.dense_layer_ids and m.resolved_dense_intermediate_size % tp:
        errors.append(f"the dense layers' MLP size ({m.resolved_dense_intermediate_size}) must be divisible by tp "
                      f"({tp})")
    if m.intermediate_size % tp:
        errors.append(f"model.intermediate_size ({m.intermediate_size}) must be divisible by tp ({tp})")
    if m.qk_norm == "full" and layout.tp_enabled:
        errors.append(f"model.qk_norm = 'full' (OLMoE) normalises over every attention head, which tp ({tp}) splits "
                      f"over ranks; use tp = 1 (data, pipeline and expert parallelism all work)")
    if m.n_shared_experts > 0 and m.resolved_shared_intermediate_size % tp:
        errors.append(
            f"shared expert hidden size ({m.resolved_shared_intermediate_size}) must be divisible by tp ({tp})"
        )
    if vocab_parallel and layout.tp_enabled:
        if m.vocab_size <= 0:
            errors.append("model.vocab_size must be resolved (> 0) before checking vocab parallelism over tp")
        elif m.vocab_size % tp:
            errors.append(f"model.vocab_size ({m.vocab_size}) must be divisible by tp ({tp}) for vocab parallelism")
    if m.num_experts % ep:
        errors.append(f"model.num_experts ({m.num_experts}) must be divisible by ep ({ep})")
    if dp % ep:
        errors.append(f"ep ({ep}) must divide dp ({dp}): experts are sharded over data-parallel ranks")
    if m.n_layers < pp:
        errors.append(f"model.n_layers ({m.n_layers}) must be >= pp ({pp}): every stage needs a layer")
    if global_batch_size < 1 or micro_batch_size < 1:
        errors.append(
            f"train.global_batch_size ({global_batch_size}) and train.micro_batch_size ({micro_batch_size}) "
            "must be >= 1"
        )
        return errors, warnings
    if global_batch_size % (dp * micro_batch_size):
        errors.append(
            f"train.global_batch_size ({global_batch_size}) must be divisible by dp*micro_batch_size "
            f"({dp}*{micro_batch_size} = {dp * micro_batch_size}) so each data-parallel rank gets whole micro batches"
        )
    n_micro = global_batch_size // (dp * micro_batch_size)
    if layout.pp_enabled and n_micro < 1:
        errors.append(
            f"pipeline parallelism needs >= 1 micro batch per data-parallel rank, got global_batch_size "
            f"{global_batch_size} // (dp {dp} * micro_batch_size {micro_batch_size}) = {n_micro}"
        )
    elif layout.pp_enabled and n_micro < pp:
        warnings.append(
            f"{n_micro} micro batches per data-parallel rank < pp ({pp}): the 1F1B pipeline never fills and "
            "stages idle; raise global_batch_size or lower micro_batch_size"
        )
    return errors, warnings


def _describe_valid(layouts: list[Layout], world_size: int) -> str:
    if not layouts:
        return f"no layout is valid for world size {world_size} with this model and batch size"
    shown = ", ".join(str(x) for x in layouts[:_MAX_LISTED])
    more = f" and {len(layouts) - _MAX_LISTED} more" if len(layouts) > _MAX_LISTED else ""
    return f"valid layouts for world size {world_size}: {shown}{more}"


def validate_layout(
    layout: Layout,
    world_size: int,
    model_args: ModelArgs,
    global_batch_size: int,
    micro_batch_size: int,
    vocab_parallel: bool = False,
) -> list[str]:
    """Check `layout` against everything it must fit; raise one ValueError naming every violated constraint.

    The error also lists the layouts that would be valid for `world_size`. Returns (and logs) warnings for legal
    but slow choices, such as a pipeline with fewer micro batches than stages.
    """
    errors, warnings = _layout_problems(
        layout, world_size, model_args, global_batch_size, micro_batch_size, vocab_parallel
    )
    if errors:
        valid = (
            valid_layouts(world_size, model_args, global_batch_size, micro_batch_size, vocab_parallel)
            if isinstance(world_size, int) and world_size >= 1 and global_batch_size >= 1 and micro_batch_size >= 1
            else []
        )
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ValueError(
            f"invalid parallel layout {layout} for world size {world_size}:\n{lines}\n"
            f"{_describe_valid(valid, world_size)}"
        )
    for w in warnings:
        logger.warning("layout %s: %s", layout, w)
    return warnings


def _candidate_layouts(world_size: int) -> list[Layout]:
    """Every (dp, tp, pp, ep) with dp*tp*pp == world_size and ep dividing dp."""
    out = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            out.extend(Layout(dp=dp, tp=tp, pp=pp, ep=ep) for ep in _divisors(dp))
    return out


def _preference_key(layout: Layout, fixed_tp: int | None = None, fixed_ep: int | None = None) -> tuple:
    """Smaller is better. Documented order: keep tp <= the configured tp, then more data parallelism (cheapest on
    CPUs and slow networks), then fewer pipeline stages, then ep equal to the configured ep (or, when ep is free,
    as large as possible: expert parallelism divides expert memory). dp and pp fix tp, so the order is total."""
    tp_over = fixed_tp is not None and layout.tp > fixed_tp
    if fixed_ep is None:
        ep_key = (False, False, -layout.ep)
    else:  # keep the configured ep; else the largest below it; else the smallest above it
        above = layout.ep > fixed_ep
        ep_key = (layout.ep != fixed_ep, above, layout.ep if above else -layout.ep)
    return (tp_over, -layout.dp, layout.pp, *ep_key)


def _require_planning_inputs(world_size: int, global_batch_size: int, micro_batch_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive int, got {world_size!r}")
    if global_batch_size < 1 or micro_batch_size < 1:
        raise ValueError(
            f"train.global_batch_size ({global_batch_size}) and train.micro_batch_size ({micro_batch_size}) "
            "must be >= 1"
        )


def valid_layouts(
    world_size: int,
    model_args: ModelArgs,
    global_batch_size: int,
    micro_batch_size: int,
    vocab_parallel: bool = False,
) -> list[Layout]:
    """All layouts that pass `validate_layout` for `world_size`, most preferred (most data-parallel) first."""
    _require_planning_inputs(world_size, global_batch_size, micro_batch_size)
    ok = [
        x for x in _candidate_layouts(world_size)
        if not _layout_problems(x, world_size, model_args, global_batch_size, micro_batch_size, vocab_parallel)[0]
    ]
    return sorted(ok, key=_preference_key)


# ---- planning ------------------------------------------------------------------------------------------------
def _fixed_degrees(parallel_cfg: ParallelConfig) -> dict[str, int]:
    fixed = {}
    for name in DEGREES:
        value = getattr(parallel_cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"parallel.{name} must be an int >= 0 (0 = choose automatically), got {value!r}")
        if value > 0:
            fixed[name] = value
    return fixed


def _fmt(degrees: dict[str, int]) -> str:
    return "·".join(f"{k}{degrees[k]}" for k in DEGREES if k in degrees) or "all-auto"


def plan_layout_with_reason(
    world_size: int,
    model_args: ModelArgs,
    parallel_cfg: ParallelConfig,
    global_batch_size: int,
    micro_batch_size: int,
    vocab_parallel: bool = False,
) -> tuple[Layout, str]:
    """`plan_layout` plus a one-line explanation of the decision."""
    _require_planning_inputs(world_size, global_batch_size, micro_batch_size)
    fixed = _fixed_degrees(parallel_cfg)
    valid = valid_layouts(world_size, model_args, global_batch_size, micro_batch_size, vocab_parallel)
    if not valid:
        reasons = []
        for x in _candidate_layouts(world_size):
            if x.ep == 1:
                errs = _layout_problems(x, world_size, model_args, global_batch_size, micro_batch_size,
                                        vocab_parallel)[0]
                reasons.append(f"  {x}: " + "; ".join(errs))
        raise ValueError(f"no valid parallel layout for world size {world_size}:\n" + "\n".join(reasons))

    def key(x: Layout) -> tuple:
        return _preference_key(x, fixed.get("tp"), fixed.get("ep"))

    # Relax the configured degrees step by step: dp is the cheapest to resize (elastic jobs change only it),
    # then ep (it must divide the new dp), and only then tp and pp.
    steps = [set(fixed), {"tp", "pp", "ep"} & set(fixed), {"tp", "pp"} & set(fixed), set()]
    best: Layout | None = None
    for keep in steps:
        matches = [x for x in valid if all(getattr(x, k) == fixed[k] for k in keep)]
        if matches:
            best = min(matches, key=key)
            break
    assert best is not None, "the last step keeps nothing, so it matches the non-empty valid list"

    chosen = _fmt({k: getattr(best, k) for k in DEGREES if k not in keep})
    if keep == set(fixed):
        reason = f"kept the configured {_fmt(fixed)}" if fixed else "all degrees auto"
        if len(keep) < len(DEGREES):
            reason += f", chose {chosen} by preference (larger dp, smaller pp, larger ep)"
    else:
        reason = f"configured {_fmt(fixed)} does not fit world size {world_size}"
        if len(fixed) == len(DEGREES):
            errs = _layout_problems(Layout(**fixed), world_size, model_args, global_batch_size, micro_batch_size,
                                    vocab_parallel)[0]
            reason += f" ({'; '.join(errs)})"
        kept = _fmt({k: fixed[k] for k in keep}) if keep else "none of it"
        reason += f"; kept {kept} and chose {chosen} (prefer tp <= configured, larger dp, smaller pp, ep as set)"
    reason = f"layout {best} for world size {world_size}: {reason}"
    return best, reason


def plan_layout(
    world_size: int,
    model_args: ModelArgs,
    parallel_cfg: ParallelConfig,
    global_batch_size: int,
    micro_batch_size: int,
    vocab_parallel: bool = False,
) -> Layout:
    """Choose the layout for `world_size` ranks; deterministic, and the result always passes `validate_layout`.

    Non-zero degrees in `parallel_cfg` are kept when they fit; 0 means "choose". When the configured degrees do not
    fit (an elastic job resized from 4 to 2 workers with dp2·pp2 fixed, say), the planner relaxes them in order:
    (1) keep every configured degree; (2) keep tp, pp and ep and resize dp; (3) keep tp and pp, resize dp and ep;
    (4) take the best valid layout. Among the layouts a step allows it prefers, in order: tp <= the configured tp,
    larger dp, smaller pp, then ep equal to the configured ep or, when ep is auto, as large as dp and num_experts
    allow. Changes to configured degrees are logged as warnings. Raises ValueError when no layout is valid.
    """
    layout, reason = plan_layout_with_reason(
        world_size, model_args, parallel_cfg, global_batch_size, micro_batch_size, vocab_parallel
    )
    fixed = _fixed_degrees(parallel_cfg)
    changed = any(getattr(layout, k) != v for k, v in fixed.items())
    logger.log(logging.WARNING if changed else logging.INFO, "%s", reason)
    validate_layout(layout, world_size, model_args, global_batch_size, micro_batch_size, vocab_parallel)
    return layout


# ---- process groups ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessGroups:
    """This rank's process groups. A kind whose degree is 1 has no group (None): skip its collectives, and use the
    `*_size`/`*_rank` helpers, which are valid either way."""

    layout: Layout
    rank: int
    tp: Any = None
    dp: Any = None
    pp: Any = None
    ep: Any = None
    edp: Any = None

    @property
    def coords(self) -> RankCoords:
        return self.layout.coords(self.rank)

    def group(self, kind: str) -> Any:
        _check_kind(kind)
        return getattr(self, kind)

    def ranks(self, kind: str) -> list[int]:
        """Global ranks of this rank's group of `kind`, in group-rank order."""
        return self.layout.group_ranks(kind, self.rank)

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def edp_size(self) -> int:
        return self.layout.edp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        """Pipeline stage of this rank."""
        return self.coords.pp

    @property
    def ep_rank(self) -> int:
        return self.coords.ep

    @property
    def edp_rank(self) -> int:
        return self.coords.edp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


def build_process_groups(layout: Layout, rank: int, backend: str | None = None) -> ProcessGroups:
    """Create every tp, dp, pp, ep and edp group of `layout` and return this rank's.

    torch.distributed.new_group must be called by every rank for every group in the same order, so each rank walks
    all groups of all kinds in GROUP_KINDS order (groups ordered by smallest member) and keeps its own. Kinds of
    degree 1 create no group and come back as None. Call after torch.distributed.init_process_group.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed initialised (call init_process_group first)")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"layout {layout} needs dp*tp*pp = {layout.world_size} ranks but torch.distributed has world size "
            f"{world}; plan the layout for the world size the job got (plan_layout)"
        )
    if rank != dist.get_rank():
        raise ValueError(f"rank {rank} passed to build_process_groups but torch.distributed says {dist.get_rank()}")
    layout._require_ep_divides_dp()

    mine: dict[str, Any] = dict.fromkeys(GROUP_KINDS)
    for kind in GROUP_KINDS:
        if layout.size(kind) == 1:
            continue
        own = layout.group_ranks(kind, rank)
        for ranks in layout.all_groups(kind):
            group = dist.new_group(ranks=ranks, backend=backend)
            if ranks == own:
                mine[kind] = group
    return ProcessGroups(layout=layout, rank=rank, **mine)
