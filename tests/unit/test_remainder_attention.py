"""The remainder heads' attention: the KV pool; hybrid attention's per-owner outputs summed over workers, and cyclic
placement's per-worker partials merged, each equal to full attention."""

import pytest
import torch
import torch.nn.functional as F

from ft.remainder_routing import RequestRouter, remainder_split
from sglang_ft.layers.attention.remainder_attention import (
    HeldSpan,
    OwnedSpan,
    RemainderKvPool,
    RemainderPoolFull,
    merge_partials,
    partial_attention,
    partial_decode_attention,
    remainder_attention,
)
from tests.thread_ranks import ThreadGroup, on_every_rank

D, GROUP = 8, 2  # head_dim, query heads per KV head


def test_the_pool_maps_global_slots_to_its_own_rows_and_frees_them_again():
    pool = RemainderKvPool(num_layers=2, num_kv_heads=1, head_dim=D, global_slots=100, capacity=4)
    slots = torch.tensor([90, 7, 42])
    k, v = torch.randn(3, 1, D), torch.randn(3, 1, D)
    pool.write(1, slots, k, v)
    assert pool.used == 3 and torch.equal(pool.read(1, slots)[0], k) and torch.equal(pool.read(1, slots)[1], v)
    pool.write(0, slots[:1], k[:1], v[:1])  # the same slot in another layer: the same row
    assert pool.used == 3
    with pytest.raises(RemainderPoolFull, match="2 rows asked, 1 of 4 free"):
        pool.assign(torch.tensor([1, 2]))
    pool.release(torch.tensor([7, 42, 5]))  # 5 was never here
    assert pool.used == 1
    with pytest.raises(KeyError):
        pool.read(1, torch.tensor([7]))
    pool.assign(torch.tensor([1, 2, 3]))
    assert pool.used == 4 and sorted(pool.local_of[[90, 1, 2, 3]].tolist()) == [0, 1, 2, 3]


def reference_attention(q, k, v):
    """Causal GQA attention over a whole sequence: q [n, heads * GROUP, D], k/v [n, heads, D]."""
    k, v = (t.repeat_interleave(GROUP, dim=1).transpose(0, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=D**-0.5).transpose(0, 1)


def test_extend_after_a_cached_prefix_and_decode_equal_attention_over_the_whole_sequence():
    torch.manual_seed(0)
    heads, n, prefix = 2, 11, 6
    q, k, v = torch.randn(n, heads * GROUP, D), torch.randn(n, heads, D), torch.randn(n, heads, D)
    expected = reference_attention(q, k, v)
    pool = RemainderKvPool(1, heads, D, global_slots=64, capacity=16)
    slots = torch.randperm(64)[:n]
    pool.write(0, slots[:prefix], k[:prefix], v[:prefix])  # the cached prefix (an earlier forward)
    # a batch: 3 rows of a request owned elsewhere, then this request's extend of the next 4 tokens
    pool.write(0, slots[prefix : n - 1], k[prefix : n - 1], v[prefix : n - 1])
    batch_q = torch.cat([torch.randn(3, heads * GROUP, D), q[prefix : n - 1]])
    out = remainder_attention(batch_q, pool, 0, [OwnedSpan(3, n - 1 - prefix, slots[: n - 1])], GROUP, D**-0.5)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    torch.testing.assert_close(out[3:], expected[prefix : n - 1])
    pool.write(0, slots[n - 1 :], k[n - 1 :], v[n - 1 :])  # decode one token
    out = remainder_attention(q[n - 1 :], pool, 0, [OwnedSpan(0, 1, slots)], GROUP, D**-0.5)
    torch.testing.assert_close(out, expected[n - 1 :])


@pytest.mark.parametrize("kv_heads, workers", [(4, 3), (8, 3), (8, 5), (6, 4)])
def test_even_heads_by_tensor_parallel_plus_remainder_heads_by_owner_sum_to_full_attention(kv_heads, workers):
    """Every worker's partial output (its even heads for every request, the remainder heads for the requests it
    owns, each through its rows of o_proj) sums over workers (the all-reduce) to the full layer's output."""
    torch.manual_seed(kv_heads * 10 + workers)
    hidden, lengths = 32, [5, 9, 3, 7, 4]
    o_proj = torch.randn(hidden, kv_heads * GROUP * D)  # [out, in] as nn.Linear
    per_request = [(torch.randn(n, kv_heads * GROUP, D), torch.randn(n, kv_heads, D), torch.randn(n, kv_heads, D))
                   for n in lengths]
    expected = torch.cat([reference_attention(q, k, v).flatten(1) @ o_proj.T for q, k, v in per_request])

    even, remainder = remainder_split(kv_heads, workers)
    first_remainder = even * workers
    router = RequestRouter(tuple(range(workers)), "load")
    owners = [router.admit(str(i), n) for i, n in enumerate(lengths)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    total = torch.zeros_like(expected)
    for rank in range(workers):
        heads = slice(rank * even, (rank + 1) * even)
        cols = slice(rank * even * GROUP * D, (rank + 1) * even * GROUP * D)
        tp = torch.cat([reference_attention(q[:, rank * even * GROUP : (rank + 1) * even * GROUP], k[:, heads],
                                            v[:, heads]).flatten(1) for q, k, v in per_request])
        partial = tp @ o_proj[:, cols].T
        if remainder:
            pool = RemainderKvPool(1, remainder, D, global_slots=sum(lengths), capacity=sum(lengths))
            spans = []
            for i, (q, k, v) in enumerate(per_request):
                if owners[i] == rank:
                    slots = torch.arange(starts[i], starts[i] + lengths[i])
                    pool.write(0, slots, k[:, first_remainder:], v[:, first_remainder:])
                    spans.append(OwnedSpan(starts[i], lengths[i], slots))
            batch_q = torch.cat([q[:, first_remainder * GROUP :] for q, _, _ in per_request])
            rem = remainder_attention(batch_q, pool, 0, spans, GROUP, D**-0.5).flatten(1)
            partial = partial + rem @ o_proj[:, first_remainder * GROUP * D :].T
        total += partial
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-4)
    if remainder:  # the remainder KV is spread by owner, not held by one worker for every request
        assert len(set(owners)) == min(workers, len(lengths))


def test_a_decode_batch_in_one_padded_call_equals_attention_per_request():
    torch.manual_seed(3)
    heads, lengths = 1, [4, 9, 1, 6]
    pool = RemainderKvPool(2, heads, D, global_slots=64, capacity=32)
    slots = torch.randperm(63)[: sum(lengths)] + 1
    spans, cursor = [], 0
    for i, n in enumerate(lengths):
        mine = slots[cursor : cursor + n]
        pool.write(1, mine, torch.randn(n, heads, D), torch.randn(n, heads, D))
        spans.append(OwnedSpan(i, 1, mine))
        cursor += n
    q = torch.randn(len(lengths), heads * GROUP, D)
    batched = remainder_attention(q, pool, 1, spans, GROUP, D**-0.5)
    one_by_one = torch.cat([remainder_attention(q[i : i + 1], pool, 1, [OwnedSpan(0, 1, s.slots)], GROUP, D**-0.5)
                            for i, s in enumerate(spans)])
    torch.testing.assert_close(batched, one_by_one)
    pool.release(spans[2].slots)
    with pytest.raises(KeyError):
        remainder_attention(q, pool, 1, spans, GROUP, D**-0.5)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_partials_over_the_rows_each_worker_holds_merge_to_attention_over_the_whole_sequence(workers):
    """Cyclic placement: each request's rows scattered over the workers (some hold none of a request, and a worker
    may hold none of the rows a query row sees); an extend after a cached prefix and a single-token request."""
    torch.manual_seed(workers)
    heads, lengths, prefixes = 1, [11, 1, 23], [6, 0, 20]
    requests = [(torch.randn(n, heads * GROUP, D), torch.randn(n, heads, D), torch.randn(n, heads, D))
                for n in lengths]
    expected = torch.cat([reference_attention(q, k, v)[p:] for (q, k, v), p in zip(requests, prefixes)])
    holder = [torch.randint(0, workers, (n,)) for n in lengths]
    holder[1][:] = workers - 1
    group = ThreadGroup(workers)

    def rank_step(rank):
        pool = RemainderKvPool(1, heads, D, global_slots=64, capacity=64)
        spans, start, queries = [], 0, []
        for i, ((q, k, v), p) in enumerate(zip(requests, prefixes)):
            slots = torch.arange(i * 20, i * 20 + lengths[i])
            mine = holder[i] == rank
            pool.write(0, slots[mine], k[mine], v[mine])
            spans.append(HeldSpan(start, lengths[i] - p, p, slots[mine], torch.arange(lengths[i])[mine]))
            queries.append(q[p:])
            start += lengths[i] - p
        out, lse = partial_attention(torch.cat(queries), pool, 0, spans, GROUP, D**-0.5)
        return merge_partials(out, lse, rank, workers, group.all_reduce_for(rank))

    merged = on_every_rank(workers, rank_step)
    for rank in range(workers):
        torch.testing.assert_close(merged[rank], expected, rtol=1e-5, atol=1e-5)
    assert group.calls == 1  # one collective for the whole batch


def test_a_decode_batch_in_one_padded_call_equals_partials_per_request():
    torch.manual_seed(4)
    heads, lengths = 1, [5, 12, 2]
    pool = RemainderKvPool(1, heads, D, global_slots=64, capacity=64)
    table = torch.zeros((len(lengths), max(lengths)), dtype=torch.int64)
    held = torch.zeros_like(table, dtype=torch.bool)
    spans = []
    for i, n in enumerate(lengths):
        slots = torch.arange(i * 20, i * 20 + n)
        mine = torch.rand(n) < 0.5
        mine[-1] = i != 2  # request 2: this rank holds none of its rows
        mine[:] = mine if i != 2 else False
        pool.write(0, slots[mine], torch.randn(int(mine.sum()), heads, D), torch.randn(int(mine.sum()), heads, D))
        table[i, :n], held[i, :n] = slots, mine
        spans.append(HeldSpan(i, 1, n - 1, slots[mine], torch.arange(n)[mine]))
    q = torch.randn(len(lengths), heads * GROUP, D)
    out, lse = partial_decode_attention(q, pool, 0, table, held, GROUP, D**-0.5)
    expected_out, expected_lse = partial_attention(q, pool, 0, spans, GROUP, D**-0.5)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.isinf(lse[2]).all() and not out[2].any()
