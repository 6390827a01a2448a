"""The migration plan of a regroup is computed once, by the members, from what each of them says it holds
(elastic_tp/regroup.py: holding_of -> all-gather -> holdings_of -> plan_regroup); the controller's order only names
the group. Checked here: after an uninterrupted regroup the members' plan is the one the group's last layout gives
(what the controller used to compute beside it, and only compared), and after an interrupted one it follows what
the members really hold, which the controller cannot know."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ft.messages import Regroup
from ft.partition import ModelShape, TPLayout
from ft.planner import plan_migration
from sglang_ft.elastic_tp.regroup import holding_of, holdings_of, plan_regroup

SHAPE = ModelShape(8, 4, 8, 64, 160, 512, 2)  # 4 KV heads


def model_at(layout: TPLayout, rank: int):
    """What a member's model answers with: its shard of `layout` and the layout's remainder heads."""
    return SimpleNamespace(shard=layout.shards[rank], layout=layout)


def members_plan(order: Regroup, models: dict, hybrid: bool = False):
    """The plan every member computes, from the answers gathered in rank order (None: a joiner)."""
    held, remainder_held = holdings_of(order, [holding_of(models.get(w)) for w in order.workers])
    return plan_regroup(SHAPE, held, remainder_held, order, hybrid)


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("dead", [0, 1, 2, 3])
def test_after_an_uninterrupted_regroup_the_members_plan_is_the_one_of_the_groups_layout(dead, hybrid):
    layout = TPLayout.even(SHAPE, 4, hybrid)
    members = [w for w in range(4) if w != dead]
    order = Regroup(1, tuple(members), 5000, "test")
    plan = members_plan(order, {w: model_at(layout, w) for w in members}, hybrid)
    # the controller's former plan, from its view of the layout: every member of the old group at its rank
    view = plan_migration(SHAPE, dict(enumerate(layout.shards)), members, hybrid=hybrid)
    assert plan.layout == view.layout and plan.moves == view.moves
    assert (plan.bytes_kept, plan.bytes_p2p, plan.bytes_reloaded) == (view.bytes_kept, view.bytes_p2p,
                                                                      view.bytes_reloaded)
    assert sorted(s.num_kv_heads for s in plan.layout.shards) == ([1, 1, 1] if hybrid else [1, 1, 2])


def test_a_joiner_takes_everything_from_the_survivors():
    """TP 3 -> 2 (worker 1 died), then worker 1 restarted joins last: it holds nothing, and every byte it needs
    comes from the two survivors, none from disk."""
    three = TPLayout.even(SHAPE, 3)
    two = members_plan(Regroup(1, (0, 2), 5000, "worker 1 died"), {0: model_at(three, 0), 2: model_at(three, 2)})
    assert [s.num_kv_heads for s in two.layout.shards] == [2, 2]
    order = Regroup(2, (0, 2, 1), 5000, "rejoin of worker 1", joining=(1,))
    plan = members_plan(order, {0: model_at(two.layout, 0), 2: model_at(two.layout, 1), 1: None})
    assert sorted(s.num_kv_heads for s in plan.layout.shards) == [1, 1, 2]
    assert plan.bytes_reloaded == 0 and plan.bytes_p2p > 0
    assert {m.src for m in plan.moves if m.dst == 1} <= {0, 2}


def test_after_an_interrupted_regroup_the_plan_follows_what_the_members_hold():
    """TP 4 -> 3 was ordered; worker 0 finished its reshard, then the regroup was interrupted (another failure) and
    the same group is ordered again: the members hold shards of two layouts. The controller's view (the layout it
    ordered) says nothing moves, which would leave workers 1 and 2 with the wrong weights; the members' plan is the
    minimal migration from what they really hold."""
    four = TPLayout.even(SHAPE, 4)
    three = plan_migration(SHAPE, dict(enumerate(four.shards)), [0, 1, 2]).layout
    models = {0: model_at(three, 0), 1: model_at(four, 1), 2: model_at(four, 2)}
    plan = members_plan(Regroup(2, (0, 1, 2), 5000, "interrupted"), models)
    view = plan_migration(SHAPE, dict(zip((0, 1, 2), three.shards)), [0, 1, 2])
    assert view.moves == ()
    assert plan.bytes_p2p + plan.bytes_reloaded > 0
    held = {w: m.shard for w, m in models.items()}
    assert plan.bytes_kept == plan_migration(SHAPE, held, [0, 1, 2]).bytes_kept
