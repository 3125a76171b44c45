"""Real gloo process groups on 4 CPU processes: every group of every layout reduces over exactly its ranks."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_platform.parallel.layout import GROUP_KINDS, Layout, build_process_groups
from tinyrun import free_port

WORLD = 4
LAYOUTS = [
    Layout(dp=2, pp=2),
    Layout(dp=2, pp=2, ep=2),
    Layout(dp=4, ep=2),
    Layout(dp=2, tp=2, ep=2),
    Layout(tp=2, pp=2),
    Layout(dp=4, ep=4),
]


def _worker(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        # A wrong world size fails before any group is formed, so the ranks stay in step for what follows.
        with pytest.raises(ValueError, match="needs dp\\*tp\\*pp = 2 ranks but torch.distributed has world size 4"):
            build_process_groups(Layout(dp=2), rank)
        for layout in LAYOUTS:
            groups = build_process_groups(layout, rank)
            assert groups.coords == layout.coords(rank)
            for kind in GROUP_KINDS:
                expected = layout.group_ranks(kind, rank)
                group = groups.group(kind)
                if len(expected) == 1:
                    assert group is None, (str(layout), kind)
                    continue
                # one-hot of this rank: the reduced vector marks exactly the members, the sum checks no double counts
                onehot = torch.zeros(WORLD, dtype=torch.int64)
                onehot[rank] = 1
                dist.all_reduce(onehot, group=group)
                members = onehot.nonzero().flatten().tolist()
                assert members == sorted(expected) and int(onehot.sum()) == len(expected), (str(layout), kind, members)
                assert dist.get_world_size(group) == layout.size(kind)
                assert dist.get_rank(group) == expected.index(rank) == getattr(groups.coords, kind)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_groups_reduce_over_exactly_their_ranks():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
