"""The Continuous-Minimal-Migration planner (ft.planner): valid partitions that move the fewest bytes."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ft.partition import ModelShape, TPLayout, balanced_sizes, spans_from_sizes
from ft.planner import Bandwidth, best_spans, bytes_per_unit, issue_order, plan_migration, schedule_transfers


def brute_force_overlap(total, old):
    """Max total overlap over every order of workers along the axis and every placement of the larger parts."""
    k = len(old)
    base, extra = divmod(total, k)
    best = 0
    for order in itertools.permutations(range(k)):
        for bigs in itertools.combinations(range(k), extra):
            sizes = [base + (1 if pos in bigs else 0) for pos in range(k)]
            spans = spans_from_sizes(sizes)
            score = 0
            for pos, worker in enumerate(order):
                if old[worker] is not None:
                    lo, hi = max(old[worker][0], spans[pos][0]), min(old[worker][1], spans[pos][1])
                    score += max(0, hi - lo)
            best = max(best, score)
    return best


def overlap_of(old, new):
    return sum(max(0, min(o[1], n[1]) - max(o[0], n[0])) for o, n in zip(old, new) if o is not None)


@st.composite
def survivors_case(draw):
    """An old balanced layout of `total` units over n workers, and a subset of survivors plus rejoiners."""
    n = draw(st.integers(1, 5))
    total = draw(st.integers(n, 14))
    old_spans = spans_from_sizes(balanced_sizes(total, n))
    alive = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    rejoiners = draw(st.integers(0, 2))
    old = [s for s, a in zip(old_spans, alive) if a] + [None] * rejoiners
    if not old or len(old) > total:
        old = [old_spans[0]]
    return total, old


@settings(max_examples=300, deadline=None)
@given(survivors_case())
def test_best_spans_is_a_balanced_partition_with_brute_force_minimum(case):
    total, old = case
    spans = best_spans(total, old)
    sizes = sorted(e - s for s, e in spans)
    assert sorted(u for s, e in spans for u in range(s, e)) == list(range(total))
    assert sizes[-1] - sizes[0] <= 1 and sizes[0] >= 1
    assert overlap_of(old, spans) == brute_force_overlap(total, old)


SHAPE = ModelShape(num_attention_heads=8, num_key_value_heads=4, head_dim=8, hidden_size=64,
                   intermediate_size=160, vocab_size=512, num_layers=2)


def _held(layout):
    return {rank: shard for rank, shard in enumerate(layout.shards)}


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 4), st.data())
def test_plan_is_valid_and_moves_the_brute_force_minimum(tp, data):
    layout = TPLayout.even(SHAPE, tp)
    dead = data.draw(st.integers(0, tp - 1))
    survivors = [w for w in range(tp) if w != dead]
    plan = plan_migration(SHAPE, _held(layout), survivors)
    plan.layout.validate()
    unit = bytes_per_unit(SHAPE)
    totals = {"kv_heads": 4, "mlp_columns": 160, "vocab_rows": 512}
    assert plan.bytes_kept + plan.bytes_p2p + plan.bytes_reloaded == sum(totals[d] * unit[d] for d in totals)
    # what only the dead worker held must come from disk, nothing else does
    dead_shard = layout.shards[dead]
    assert plan.bytes_reloaded == sum((getattr(dead_shard, d)[1] - getattr(dead_shard, d)[0]) * unit[d] for d in totals)
    best_kept = 0
    for dim, total in totals.items():
        old = [getattr(layout.shards[w], dim) for w in survivors]
        best_kept += brute_force_overlap(total, old) * unit[dim]
    assert plan.bytes_kept == best_kept


def test_tp4_to_tp3_reloads_less_than_one_workers_share():
    layout = TPLayout.even(SHAPE, 4)
    plan = plan_migration(SHAPE, _held(layout), [0, 1, 3])
    unit = bytes_per_unit(SHAPE)
    one_share = 1 * unit["kv_heads"] + 40 * unit["mlp_columns"] + 128 * unit["vocab_rows"]  # a quarter of each
    assert 0 < plan.bytes_reloaded <= one_share
    for worker in (0, 1, 3):  # every survivor keeps its whole old KV head
        assert set(range(*layout.shards[worker].kv_heads)) <= set(range(*plan.shard_of(worker).kv_heads))


def test_rejoin_keeps_everything_survivors_hold_and_loads_only_what_they_give_up():
    three = plan_migration(SHAPE, _held(TPLayout.even(SHAPE, 4)), [0, 1, 2]).layout
    held = {0: three.shards[0], 1: three.shards[1], 2: three.shards[2], 3: None}
    plan = plan_migration(SHAPE, held, [0, 1, 2, 3])
    assert plan.bytes_reloaded == 0  # every slice the joiner needs is held by a peer
    assert any(m.dst == 3 for m in plan.moves) and all(m.src is not None for m in plan.moves)


def test_plan_refuses_a_group_wider_than_the_kv_heads():
    with pytest.raises(ValueError, match="--tp-size"):
        plan_migration(SHAPE, _held(TPLayout.even(SHAPE, 4)), [0, 1, 2, 3, 4])


def test_schedule_overlaps_peer_copies_and_disk_reads():
    plan = plan_migration(SHAPE, _held(TPLayout.even(SHAPE, 4)), [1, 2, 3])
    schedule = schedule_transfers(plan, Bandwidth(p2p=1e9, disk=1e8))
    queued = [m for q in (*schedule.p2p_queues.values(), *schedule.disk_queues.values()) for m in q]
    assert sorted(queued, key=repr) == sorted(plan.moves, key=repr)
    assert all(m.src is None for q in schedule.disk_queues.values() for m in q)
    assert 0 < schedule.estimated_s <= schedule.sequential_s
    for queue in schedule.p2p_queues.values():
        assert [m.nbytes for m in queue] == sorted((m.nbytes for m in queue), reverse=True)


@pytest.mark.parametrize("old_width,new_workers,hybrid", [
    (4, [0, 1, 2], False), (4, [1, 2, 3], False), (8, [0, 1, 2, 4, 5, 6, 7], False), (8, [0, 2, 3, 5, 6, 7], False),
    (4, [0, 1, 3], True), (2, [0, 1, 2], False)])  # deaths, a hybrid layout, a rejoin (worker 2 holds nothing)
def test_the_issue_order_keeps_every_links_queue_and_starts_every_link_at_once(old_width, new_workers, hybrid):
    shape = ModelShape(16, 8, 8, 128, 96, 128, 2)
    plan = plan_migration(shape, dict(enumerate(TPLayout.even(shape, old_width).shards)), new_workers, hybrid=hybrid)
    schedule = schedule_transfers(plan, Bandwidth(p2p=1e9, disk=1e8))
    order = issue_order(schedule)
    peer_moves = [m for m in plan.moves if m.src is not None and m.src != m.dst]
    assert peer_moves and sorted(order, key=repr) == sorted(peer_moves, key=repr)
    for dst, queue in schedule.p2p_queues.items():
        assert tuple(m for m in order if m.dst == dst) == queue
    firsts = {queue[0] for queue in schedule.p2p_queues.values()}  # every link starts on its longest move
    assert set(order[:len(firsts)]) == firsts


def test_a_hybrid_plan_spreads_the_divisible_heads_and_gives_every_rank_the_remainder():
    """8 KV heads, worker 2 of 4 lost: 2 heads each by TP over 3 workers, heads 6-7 the remainder; a survivor keeps
    what it held of the TP part, and the remainder heads' weights go from their holder to every other rank."""
    shape = ModelShape(16, 8, 8, 128, 96, 128, 2)
    held = dict(enumerate(TPLayout.even(shape, 4).shards))
    plan = plan_migration(shape, held, [0, 1, 3], hybrid=True)
    assert plan.layout.remainder == (6, 8) and [s.kv_heads for s in plan.layout.shards] == [(0, 2), (2, 4), (4, 6)]
    tp_moves = {(m.start, m.end, m.src) for m in plan.moves if m.dim == "kv_heads" and not m.to_remainder}
    assert tp_moves == {(4, 6, None)}  # worker 2's heads, from disk
    remainder_moves = {(m.start, m.end, m.dst, m.src) for m in plan.moves if m.to_remainder}
    assert remainder_moves == {(6, 8, 0, 3), (6, 8, 1, 3)}  # worker 3 held them by TP: peer to peer
    assert plan_migration(shape, held, [0, 1, 3]).layout.remainder == (0, 0)
    assert plan_migration(shape, held, [0, 1, 2, 3], hybrid=True).layout.remainder == (0, 0)  # 8 over 4: none


def test_a_rejoin_after_hybrid_attention_takes_the_remainder_heads_from_a_peer_not_the_disk():
    """4 KV heads at TP 3 hybrid (1 each by TP, head 3 the remainder on every rank) back to TP 4: the joiner's
    head comes from a survivor's remainder copy; no byte is read from disk."""
    shape = ModelShape(8, 4, 8, 64, 96, 128, 2)
    hybrid = plan_migration(shape, dict(enumerate(TPLayout.even(shape, 4).shards)), [0, 2, 3], hybrid=True).layout
    held = dict(zip([0, 2, 3], hybrid.shards))
    plan = plan_migration(shape, held, [0, 1, 2, 3], remainder_held={w: hybrid.remainder for w in (0, 2, 3)})
    heads = [m for m in plan.moves if m.dim == "kv_heads"]
    assert plan.bytes_reloaded == 0 and heads and all(m.from_remainder and m.src in (0, 2, 3) for m in heads)
    without = plan_migration(shape, held, [0, 1, 2, 3])
    assert without.bytes_reloaded > 0  # what the remainder holders save


def test_a_workers_own_remainder_head_that_becomes_its_tp_head_is_kept_and_its_kv_restored():
    shape = ModelShape(8, 4, 8, 64, 96, 128, 2)
    held = {0: TPLayout.even(shape, 2).shards[0]}  # worker 0 alone held heads 0-1 by TP ...
    plan = plan_migration(shape, held, [0], remainder_held={0: (2, 4)})  # ... and 2-3 as remainder
    assert [(m.start, m.end, m.src, m.from_remainder) for m in plan.moves if m.dim == "kv_heads"] == [(2, 4, 0, True)]
    assert plan.bytes_p2p == 0  # a local copy, not a transfer (the other dimensions' halves come from disk)
