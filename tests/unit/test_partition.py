"""The unequal-width partition (ft.partition): every layout tiles every dimension, balanced to one unit."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ft.partition import ModelShape, TPLayout, balanced_sizes, check_tp_size


@st.composite
def shapes_and_widths(draw):
    kv_heads = draw(st.integers(1, 16))
    group = draw(st.integers(1, 4))
    shape = ModelShape(
        num_attention_heads=kv_heads * group,
        num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 64, 128])),
        hidden_size=draw(st.integers(8, 512)),
        intermediate_size=draw(st.integers(kv_heads, 4096)),
        vocab_size=draw(st.integers(kv_heads, 50000)),
        num_layers=draw(st.integers(1, 4)),
    )
    return shape, draw(st.integers(1, kv_heads))


@given(shapes_and_widths())
def test_every_unit_is_held_exactly_once(case):
    shape, tp = case
    layout = TPLayout.even(shape, tp)
    assert layout.tp_size == tp
    for dim, total in (("kv_heads", shape.num_key_value_heads), ("mlp_columns", shape.intermediate_size),
                       ("vocab_rows", shape.vocab_size)):
        held = [unit for s in layout.shards for unit in range(*getattr(s, dim))]
        assert sorted(held) == list(range(total)), dim
    q_held = [h for s in layout.shards for h in range(*s.q_heads(shape.group_size))]
    assert sorted(q_held) == list(range(shape.num_attention_heads))


@given(shapes_and_widths())
def test_widths_differ_by_at_most_one_gqa_group(case):
    shape, tp = case
    layout = TPLayout.even(shape, tp)
    kv = [s.num_kv_heads for s in layout.shards]
    q = [s.q_heads(shape.group_size)[1] - s.q_heads(shape.group_size)[0] for s in layout.shards]
    assert min(kv) >= 1 and max(kv) - min(kv) <= 1
    assert max(q) - min(q) <= shape.group_size
    for dim in ("num_mlp_columns", "num_vocab_rows"):
        sizes = [getattr(s, dim) for s in layout.shards]
        assert max(sizes) - min(sizes) <= 1, dim


@given(shapes_and_widths())
def test_layout_survives_json(case):
    shape, tp = case
    layout = TPLayout.even(shape, tp)
    assert TPLayout.from_json(layout.to_json()) == layout


def test_eight_heads_over_three_ranks_is_whole_groups():
    shape = ModelShape(8, 4, 8, 64, 160, 512, 2)
    layout = TPLayout.even(shape, 3)
    assert [s.kv_heads for s in layout.shards] == [(0, 2), (2, 3), (3, 4)]
    assert [s.q_heads(2) for s in layout.shards] == [(0, 4), (4, 6), (6, 8)]
    assert [s.num_mlp_columns for s in layout.shards] == [54, 53, 53]


def test_eight_kv_heads_over_three_is_three_three_two():
    layout = TPLayout.even(ModelShape(8, 8, 8, 64, 160, 512, 2), 3)
    assert [s.num_kv_heads for s in layout.shards] == [3, 3, 2]


@pytest.mark.parametrize("tp", [0, 5, 9])
def test_tp_size_outside_whole_groups_is_refused_naming_the_flag(tp):
    with pytest.raises(ValueError, match="--tp-size"):
        check_tp_size(ModelShape(8, 4, 8, 64, 160, 512, 2), tp)


def test_overlapping_layout_is_rejected():
    shape = ModelShape(8, 4, 8, 64, 160, 512, 2)
    good = TPLayout.even(shape, 2)
    bad = TPLayout(shape, (good.shards[0], good.shards[0]))
    with pytest.raises(ValueError, match="kv_heads"):
        bad.validate()


def test_balanced_sizes_refuses_empty_parts():
    assert balanced_sizes(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError):
        balanced_sizes(2, 3)


@pytest.mark.parametrize("kv_heads, tp, per_rank, remainder", [(8, 3, 2, (6, 8)), (4, 3, 1, (3, 4)), (8, 4, 2, (0, 0)),
                                                               (12, 5, 2, (10, 12))])
def test_hybrid_layout_gives_every_rank_the_same_heads_and_keeps_the_rest_as_remainder(kv_heads, tp, per_rank,
                                                                                         remainder):
    shape = ModelShape(kv_heads * 2, kv_heads, 8, kv_heads * 16, 96, 128, 2)
    layout = TPLayout.even(shape, tp, hybrid=True)
    assert [s.num_kv_heads for s in layout.shards] == [per_rank] * tp
    assert layout.remainder == remainder and layout.num_remainder_kv_heads == kv_heads % tp
    assert TPLayout.from_json(layout.to_json()) == layout
    assert TPLayout.from_json(TPLayout.even(shape, tp).to_json()).remainder == (0, 0)  # older messages: none


@pytest.mark.parametrize("remainder", [(5, 8), (6, 7), (0, 8)])
def test_a_remainder_that_is_not_the_last_heads_left_over_is_rejected(remainder):
    shape = ModelShape(16, 8, 8, 128, 96, 128, 2)
    even = TPLayout.even(shape, 3, hybrid=True)
    with pytest.raises(ValueError):
        TPLayout(shape, even.shards, remainder).validate()
