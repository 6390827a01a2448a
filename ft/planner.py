"""Continuous Minimal Migration (AnchorTP): the new unequal-width layout that moves the fewest bytes.

Given what every worker holds now (its contiguous span of KV-head groups, MLP columns and vocabulary rows) and
who is in the new group, choose for each dimension a new contiguous, balanced span per worker (sizes differ by at
most one unit) that maximises the bytes each worker already holds. What a worker must gain comes peer to peer
from a surviving holder, or, for slices only a dead worker held, from the checkpoint on disk. Dimensions are
independent, so each is solved on its own by a small dynamic programme over the workers in order of their old
spans; workers holding nothing (rejoiners) may go anywhere in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ft.partition import ModelShape, RankShard, Span, TPLayout, check_tp_size

DIMENSIONS = ("kv_heads", "mlp_columns", "vocab_rows")


def bytes_per_unit(shape: ModelShape, tied_embeddings: bool = False, kv_bytes_per_group: int = 0) -> dict[str, int]:
    """Weight bytes of one unit of each dimension over all layers (plus live KV bytes per head group)."""
    h, hd, g, b, layers = shape.hidden_size, shape.head_dim, shape.group_size, shape.dtype_bytes, shape.num_layers
    return {
        "kv_heads": layers * (2 * g * hd * h + 2 * hd * h) * b + kv_bytes_per_group,  # q and o, k and v
        "mlp_columns": layers * 3 * h * b * shape.ffns_per_column,  # gate and up rows, down column (per expert)
        "vocab_rows": (1 if tied_embeddings else 2) * h * b,  # embedding row, LM head row
    }


@dataclass(frozen=True)
class Move:
    """Units [start, end) of a dimension that worker `dst` must receive: from worker `src`, or disk if None."""

    dim: str
    start: int
    end: int
    dst: int
    src: int | None
    nbytes: int
    # KV heads `src` holds as hybrid attention's remainder (every rank has their weights; their KV is spread over
    # the group by request, so it comes from the backup store); `src` may be `dst` itself
    from_remainder: bool = False
    to_remainder: bool = False  # weights of the new layout's remainder heads, which every rank holds whole


@dataclass(frozen=True)
class MigrationPlan:
    """The new group: `workers[r]` (a worker id) becomes TP rank r and holds `layout.shards[r]`."""

    workers: tuple[int, ...]
    layout: TPLayout
    moves: tuple[Move, ...]
    bytes_kept: int
    bytes_p2p: int
    bytes_reloaded: int

    def shard_of(self, worker: int) -> RankShard:
        return self.layout.shards[self.workers.index(worker)]


def _overlap(a: Span | None, b: Span) -> int:
    if a is None:
        return 0
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))


EXACT_MAX_WORKERS = 12  # the exact search is over subsets of workers: 2^k states


def best_spans(total: int, old: list[Span | None]) -> list[Span]:
    """New balanced contiguous spans, one per worker, maximising sum(overlap(old[i], new[i])).

    Exact for up to EXACT_MAX_WORKERS workers: a dynamic programme over (set of workers placed so far, larger
    parts used), which fixes where the next span starts; every order of workers along the axis is considered
    (keeping the old order is not always best: with spans (6,9),(9,11) of 11 units, reversing keeps 3 units, not
    2). Beyond that, workers keep their old order (holders sorted by old span, empty workers last).
    """
    k = len(old)
    if k == 0 or total < k:
        raise ValueError(f"cannot give {k} workers non-empty spans of {total} units")
    base, extra = divmod(total, k)
    if k > EXACT_MAX_WORKERS:
        order = sorted(range(k), key=lambda i: (old[i] is None, old[i] or (0, 0)))
        return _spans_in_order(order, old, base, extra)
    full = (1 << k) - 1

    @lru_cache(maxsize=None)
    def solve(placed: int, big: int) -> tuple[int, tuple]:
        if placed == full:
            return (0, ()) if big == extra else (-1, ())
        start = bin(placed).count("1") * base + big
        best, seen_empty = (-1, ()), False
        for worker in range(k):
            if placed >> worker & 1:
                continue
            if old[worker] is None:  # empty workers are interchangeable: try one of them
                if seen_empty:
                    continue
                seen_empty = True
            for larger in (0, 1) if big < extra else (0,):
                span = (start, start + base + larger)
                rest, choice = solve(placed | 1 << worker, big + larger)
                if rest >= 0 and rest + _overlap(old[worker], span) > best[0]:
                    best = (rest + _overlap(old[worker], span), ((worker, span),) + choice)
        return best

    _, choice = solve(0, 0)
    spans: list[Span] = [None] * k  # type: ignore[list-item]
    for worker, span in choice:
        spans[worker] = span
    return spans


def _spans_in_order(order: list[int], old: list[Span | None], base: int, extra: int) -> list[Span]:
    """Best sizes for a fixed order of workers along the axis (DP over larger parts used)."""

    @lru_cache(maxsize=None)
    def solve(pos: int, big: int) -> tuple[int, tuple]:
        if pos == len(order):
            return (0, ()) if big == extra else (-1, ())
        start = pos * base + big
        best = (-1, ())
        for larger in (0, 1) if big < extra else (0,):
            span = (start, start + base + larger)
            rest, choice = solve(pos + 1, big + larger)
            if rest >= 0 and rest + _overlap(old[order[pos]], span) > best[0]:
                best = (rest + _overlap(old[order[pos]], span), (span,) + choice)
        return best

    _, chosen = solve(0, 0)
    spans: list[Span] = [None] * len(order)  # type: ignore[list-item]
    for worker, span in zip(order, chosen):
        spans[worker] = span
    return spans


def plan_migration(
    shape: ModelShape,
    held: dict[int, RankShard | None],
    new_workers: list[int],
    unit_bytes: dict[str, int] | None = None,
    hybrid: bool = False,
    remainder_held: dict[int, Span] | None = None,
) -> MigrationPlan:
    """Plan the group of `new_workers` (ids, in new rank order) given what each worker holds now.

    `held` maps every worker that holds anything (dead ones included, so their slices are known) to its shard;
    a new worker absent from `held` or mapped to None holds nothing (a rejoin). With `hybrid`, only the evenly
    divisible KV heads are spread (`TPLayout.even(..., hybrid=True)`); every rank lacking a remainder head's weights
    gets them by a move (`Move.to_remainder`).
    `remainder_held` maps workers of a hybrid group to the remainder heads they hold: KV heads nobody holds by TP
    come from one of them (`Move.from_remainder`) rather than from disk.
    """
    check_tp_size(shape, len(new_workers))
    unit_bytes = unit_bytes or bytes_per_unit(shape)
    heads = shape.num_key_value_heads
    tp_heads = heads - heads % len(new_workers) if hybrid else heads
    totals = {"kv_heads": tp_heads, "mlp_columns": shape.intermediate_size, "vocab_rows": shape.vocab_size}
    live = set(new_workers)
    new_spans: dict[str, list[Span]] = {}
    moves: list[Move] = []
    kept = p2p = reloaded = 0
    for dim in DIMENSIONS:
        old = [_clip(getattr(held[w], dim), totals[dim]) if held.get(w) is not None else None for w in new_workers]
        spans = best_spans(totals[dim], old)
        new_spans[dim] = spans
        for worker, mine, span in zip(new_workers, old, spans):
            for start, end, src, from_remainder in _sources_with_remainder(span, worker, mine, dim, held, live,
                                                                             remainder_held or {}):
                nbytes = (end - start) * unit_bytes[dim]
                if src == worker and not from_remainder:
                    kept += nbytes
                    continue
                moves.append(Move(dim, start, end, worker, src, nbytes, from_remainder))
                if src == worker:
                    kept += nbytes
                elif src is None:
                    reloaded += nbytes
                else:
                    p2p += nbytes
    remainder = (tp_heads, heads) if tp_heads < heads else (0, 0)
    if tp_heads < heads:  # every rank holds the remainder heads' weights: from itself, a peer, or the disk
        for worker in new_workers:
            mine = held[worker].kv_heads if held.get(worker) is not None else None
            for start, end, src, from_remainder in _sources_with_remainder(remainder, worker, mine, "kv_heads",
                                                                         held, live, remainder_held or {}):
                nbytes = (end - start) * unit_bytes["kv_heads"]
                if src == worker:
                    kept += nbytes
                    continue
                moves.append(Move("kv_heads", start, end, worker, src, nbytes, from_remainder, to_remainder=True))
                if src is None:
                    reloaded += nbytes
                else:
                    p2p += nbytes
    shards = tuple(RankShard(*(new_spans[d][r] for d in DIMENSIONS)) for r in range(len(new_workers)))
    layout = TPLayout(shape, shards, remainder)
    layout.validate()
    return MigrationPlan(tuple(new_workers), layout, tuple(moves), kept, p2p, reloaded)


def _clip(span: Span, total: int) -> Span | None:
    """`span` within [0, total) (a worker's heads beyond a hybrid layout's TP part count for nothing there)."""
    return (span[0], min(span[1], total)) if span[0] < total else None


def _sources_with_remainder(span: Span, worker: int, mine: Span | None, dim: str, held, live,
                            remainder_held: dict[int, Span]) -> list[tuple[int, int, int | None, bool]]:
    """`_sources`, where KV heads no live worker holds by TP come from a live holder of them as remainder heads
    (this worker first) before the disk."""
    found = []
    for start, end, src in _sources(span, worker, mine, dim, held, live):
        if src is not None or dim != "kv_heads" or not remainder_held:
            found.append((start, end, src, False))
            continue
        holders = {w: RankShard(s, (0, 0), (0, 0)) for w, s in remainder_held.items() if w in live}
        for lo, hi, holder in _sources((start, end), worker, remainder_held.get(worker) if worker in live else None,
                                       dim, holders, live):
            found.append((lo, hi, holder, holder is not None))
    return found


def _sources(span: Span, worker: int, mine: Span | None, dim: str, held, live) -> list[tuple[int, int, int | None]]:
    """Split `span` into pieces tagged with where each comes from: the worker itself, a live peer, or None."""
    holders = [(worker, mine)] if mine is not None else []
    holders += [(w, getattr(s, dim)) for w, s in held.items() if s is not None and w in live and w != worker]
    pieces, cursor = [], span[0]
    for w, (start, end) in sorted(holders, key=lambda x: x[1]):
        lo, hi = max(start, span[0]), min(end, span[1])
        if lo >= hi:
            continue
        if lo > cursor:
            pieces.append((cursor, lo, None))
        pieces.append((lo, hi, w))
        cursor = hi
    if cursor < span[1]:
        pieces.append((cursor, span[1], None))
    return pieces


@dataclass(frozen=True)
class Bandwidth:
    """Bytes per second of one worker's peer link (each direction) and of its checkpoint reads."""

    p2p: float
    disk: float


@dataclass(frozen=True)
class TransferSchedule:
    """Per worker: its peer transfers and its disk reads, run concurrently, longest first."""

    p2p_queues: dict[int, tuple[Move, ...]] = field(default_factory=dict)
    disk_queues: dict[int, tuple[Move, ...]] = field(default_factory=dict)
    estimated_s: float = 0.0
    sequential_s: float = 0.0  # the same moves done one after the other, for comparison


def schedule_transfers(plan: MigrationPlan, bandwidth: Bandwidth) -> TransferSchedule:
    """Run peer-to-peer copies and disk reloads at once; the time is the busiest link's.

    A worker's inbound peer traffic, each source's outbound traffic and each worker's disk reads are separate
    links; the estimate is the slowest of them, against doing every move in sequence.
    """
    p2p_in: dict[int, list[Move]] = {}
    disk: dict[int, list[Move]] = {}
    p2p_out: dict[int, int] = {}
    for move in plan.moves:
        if move.src == move.dst:  # a worker's own remainder heads becoming TP heads: a local copy
            continue
        if move.src is None:
            disk.setdefault(move.dst, []).append(move)
        else:
            p2p_in.setdefault(move.dst, []).append(move)
            p2p_out[move.src] = p2p_out.get(move.src, 0) + move.nbytes
    link_times = [sum(m.nbytes for m in ms) / bandwidth.p2p for ms in p2p_in.values()]
    link_times += [b / bandwidth.p2p for b in p2p_out.values()]
    link_times += [sum(m.nbytes for m in ms) / bandwidth.disk for ms in disk.values()]
    sequential = plan.bytes_p2p / bandwidth.p2p + plan.bytes_reloaded / bandwidth.disk
    longest_first = lambda ms: tuple(sorted(ms, key=lambda m: -m.nbytes))  # noqa: E731
    return TransferSchedule(
        {w: longest_first(ms) for w, ms in p2p_in.items()},
        {w: longest_first(ms) for w, ms in disk.items()},
        max(link_times, default=0.0),
        sequential,
    )


def issue_order(schedule: TransferSchedule) -> tuple[Move, ...]:
    """Every peer move of `schedule` in one order that all ranks derive alike: the inbound queues interleaved
    position by position (destinations by id), so every link starts on its longest move and runs its queue in the
    schedule's order.

    Each rank issues its own sends and receives as a subsequence of this order, so the ends of every pair issue
    their transfers in the same order (NCCL matches a pair's transfers by order, not tag) and the earliest
    unfinished move always has both ends at it: no wait can close a cycle.
    """
    queues = [schedule.p2p_queues[worker] for worker in sorted(schedule.p2p_queues)]
    depth = max((len(queue) for queue in queues), default=0)
    return tuple(queue[i] for i in range(depth) for queue in queues if i < len(queue))
