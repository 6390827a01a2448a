"""The remainder heads' KV and attention: the `H % W` KV heads that do not divide over W workers.

Their KV lives in a pool of its own on each worker, holding only the rows placed there; SGLang's token slots (the
same on every rank) address it through a map. Two placements (`hybrid_attention.py`, `cyclic_placement.py`):

- hybrid attention (per request): each request's rows whole on its owner, which computes its attention; the output
  is zero on other requests' rows, so the usual row-parallel output projection and all-reduce add each request's
  remainder heads exactly once (`remainder_attention`).
- cyclic placement (per token): a request's rows rotate over the workers; each worker attends over the rows it
  holds and returns the partial output with its log-sum-exp, and the partials are merged across workers as flash
  attention merges tiles (`partial_attention`, `partial_decode_attention`, `merge_partials`).

Plain torch: the same on CPU and CUDA, without an attention backend's paged kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RemainderPoolFull(RuntimeError):
    """The owner has no free row left for the remainder heads' KV."""


class RemainderKvPool:
    """KV rows of the remainder heads, [layers, capacity, heads, head_dim], addressed by SGLang's global slots."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, global_slots: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.local_of = torch.full((global_slots,), -1, dtype=torch.int64, device=device)
        self._free = torch.arange(capacity, dtype=torch.int64, device=device)  # a stack: the last ones go first
        self._free_count = capacity

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def used(self) -> int:
        return self.capacity - self._free_count

    def assign(self, global_slots: torch.Tensor) -> torch.Tensor:
        """Local rows of `global_slots`, taking free rows for those without one."""
        local = self.local_of[global_slots]
        new = torch.unique(global_slots[local < 0])
        if len(new):
            if len(new) > self._free_count:
                raise RemainderPoolFull(f"{len(new)} rows asked, {self._free_count} of {self.capacity} free")
            self._free_count -= len(new)
            self.local_of[new] = self._free[self._free_count : self._free_count + len(new)]
            local = self.local_of[global_slots]
        return local

    def release(self, global_slots: torch.Tensor) -> None:
        """SGLang freed these slots: their rows (where this worker has them) are free again."""
        local = self.local_of[global_slots]
        held = torch.unique(local[local >= 0])
        self._free[self._free_count : self._free_count + len(held)] = held
        self._free_count += len(held)
        self.local_of[global_slots] = -1

    def write(self, layer: int, global_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        local = self.assign(global_slots)
        self.k[layer, local] = k.to(self.k.dtype)
        self.v[layer, local] = v.to(self.v.dtype)

    def rows(self, global_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's K and V rows of `global_slots` (held here), [layers, slots, heads, head_dim]."""
        local = self.local_of[global_slots]
        if bool((local < 0).any()):
            raise KeyError("asked for remainder KV rows this worker does not hold")
        return self.k[:, local], self.v[:, local]

    def put_rows(self, global_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store every layer's K and V rows of `global_slots` (a copy from the worker that wrote them)."""
        local = self.assign(global_slots)
        self.k[:, local] = k.to(self.k.dtype)
        self.v[:, local] = v.to(self.v.dtype)

    def read(self, layer: int, global_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.local_of[global_slots]
        if bool((local < 0).any()):
            raise KeyError("a slot of an owned request has no remainder KV on this worker")
        return self.k[layer, local], self.v[layer, local]


@dataclass(frozen=True)
class OwnedSpan:
    """One owned request in a forward batch: its query rows [start, start + count) and the global slots of its
    whole sequence so far (cached prefix, then those `count` tokens)."""

    start: int
    count: int
    slots: torch.Tensor


@dataclass(frozen=True)
class RemainderBatch:
    """A forward batch as the remainder heads see it on one rank: the token rows of the requests it owns
    (`rows`, in batch order), the slots those tokens write, each owned request's span in the owned rows."""

    pool: RemainderKvPool
    rows: torch.Tensor
    new_slots: torch.Tensor
    spans: list[OwnedSpan]


def remainder_attention(q: torch.Tensor, pool: RemainderKvPool, layer: int, spans: list[OwnedSpan],
                        group_size: int, scaling: float) -> torch.Tensor:
    """Causal attention of the remainder query heads `q` [tokens, kv_heads * group_size, head_dim] over the owned
    requests' KV in `pool`; rows of requests not owned here are zero."""
    if len(spans) > 1 and all(span.count == 1 for span in spans) and len(q) == len(spans):
        return _decode_attention(q, pool, layer, spans, group_size, scaling)
    out = torch.zeros_like(q)
    for span in spans:
        k, v = pool.read(layer, span.slots)
        k = k.repeat_interleave(group_size, dim=1).transpose(0, 1)  # [heads, kv_len, head_dim]
        v = v.repeat_interleave(group_size, dim=1).transpose(0, 1)
        query = q[span.start : span.start + span.count].transpose(0, 1)
        prefix = len(span.slots) - span.count
        keys = torch.arange(len(span.slots), device=q.device)
        mask = keys[None, :] <= (prefix + torch.arange(span.count, device=q.device))[:, None]
        attended = F.scaled_dot_product_attention(query, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                                  scale=scaling)
        out[span.start : span.start + span.count] = attended.transpose(0, 1)
    return out


def _decode_attention(q, pool: RemainderKvPool, layer: int, spans: list[OwnedSpan], group_size: int,
                      scaling: float) -> torch.Tensor:
    """A decode batch (one query row per owned request, `q` holding exactly those rows): one padded attention call
    for all of them, each request's row attending to its own sequence."""
    lengths = torch.tensor([len(span.slots) for span in spans], device=q.device)
    table = torch.nn.utils.rnn.pad_sequence([span.slots for span in spans], batch_first=True)
    valid = torch.arange(table.shape[1], device=q.device)[None, :] < lengths[:, None]
    local = pool.local_of[table]
    if bool((local[valid] < 0).any()):
        raise KeyError("a slot of an owned request has no remainder KV on this worker")
    local = local.clamp(min=0)
    k = pool.k[layer, local].to(q.dtype).repeat_interleave(group_size, dim=2).transpose(1, 2)  # [n, heads, len, d]
    v = pool.v[layer, local].to(q.dtype).repeat_interleave(group_size, dim=2).transpose(1, 2)
    query = q[:, :, None, :]  # [n, heads, 1, d]
    attended = F.scaled_dot_product_attention(query, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    return attended[:, :, 0, :]


@dataclass(frozen=True)
class HeldSpan:
    """One request of a forward batch under cyclic placement: its query rows [start, start + count) at positions
    [prefix, prefix + count), and the slots of its sequence this rank holds, with their positions."""

    start: int
    count: int
    prefix: int
    slots: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class CyclicBatch:
    """A forward batch as the remainder heads see it on one rank under cyclic placement."""

    pool: RemainderKvPool
    written_rows: torch.Tensor  # batch rows whose new slot this rank holds (it writes their K and V)
    written_slots: torch.Tensor
    spans: list[HeldSpan]  # an extend batch's requests (empty for a decode batch)
    projected_rows: torch.Tensor  # batch rows whose output projection this rank adds (each row on one rank)
    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor]
    # a decode batch, one query row per request: its sequences' slots [requests, longest] and which of them this
    # rank holds (False past a sequence's end); every position is before the query's
    decode_slots: torch.Tensor | None = None
    decode_held: torch.Tensor | None = None

    def partial_attention(self, q: torch.Tensor, layer: int, group_size: int,
                          scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.decode_slots is not None:
            return partial_decode_attention(q, self.pool, layer, self.decode_slots, self.decode_held, group_size,
                                            scaling)
        return partial_attention(q, self.pool, layer, self.spans, group_size, scaling)


def partial_attention(q: torch.Tensor, pool: RemainderKvPool, layer: int, spans: list[HeldSpan], group_size: int,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of `q` [tokens, query heads, head_dim] over the rows this rank holds: the output
    normalised over those rows, and their log-sum-exp [tokens, query heads] (-inf where it holds none)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for span in spans:
        if not len(span.slots):
            continue
        k, v = pool.read(layer, span.slots)
        k = k.float().repeat_interleave(group_size, dim=1).transpose(0, 1)  # [heads, held, head_dim]
        v = v.float().repeat_interleave(group_size, dim=1).transpose(0, 1)
        rows = slice(span.start, span.start + span.count)
        query = q[rows].float().transpose(0, 1)  # [heads, count, head_dim]
        scores = query @ k.transpose(1, 2) * scaling
        visible = span.positions[None, :] <= (span.prefix + torch.arange(span.count, device=q.device))[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        part_lse = scores.logsumexp(-1)  # [heads, count]
        weights = torch.exp(scores - part_lse[..., None]).nan_to_num(0.0)  # rows with no visible key: zeros
        out[rows] = (weights @ v).transpose(0, 1)
        lse[rows] = part_lse.transpose(0, 1)
    return out, lse


def partial_decode_attention(q: torch.Tensor, pool: RemainderKvPool, layer: int, slots: torch.Tensor,
                             held: torch.Tensor, group_size: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`partial_attention` for a decode batch in one padded call: query row i over the held slots of row i."""
    local = pool.local_of[slots].clamp(min=0)  # rows not held are masked out below
    k, v = pool.k[layer, local].float(), pool.v[layer, local].float()  # [n, longest, kv heads, head_dim]
    n, kv_heads = len(q), k.shape[2]
    grouped = q.float().view(n, kv_heads, group_size, -1)  # the query heads sharing each KV head
    scores = torch.einsum("nkgd,nlkd->nkgl", grouped, k).reshape(n, kv_heads * group_size, -1) * scaling
    scores = scores.masked_fill(~held[:, None, :], float("-inf"))
    lse = scores.logsumexp(-1)  # [n, heads]
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0).view(n, kv_heads, group_size, -1)
    return torch.einsum("nkgl,nlkd->nkgd", weights, v).reshape(n, kv_heads * group_size, -1), lse


def merge_partials(out: torch.Tensor, lse: torch.Tensor, rank: int, size: int,
                   all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Every rank's partial attention merged into the whole: one all-reduce gathers (output, log-sum-exp) of
    every rank (each fills its own slice), then each row is the partials weighted by exp(lse - max)."""
    head_dim = out.shape[-1]
    gathered = torch.zeros((size, *out.shape[:-1], head_dim + 1), dtype=torch.float32, device=out.device)
    gathered[rank, ..., :head_dim] = out
    gathered[rank, ..., head_dim] = lse
    gathered = all_reduce(gathered)
    parts, part_lse = gathered[..., :head_dim], gathered[..., head_dim]
    weights = torch.exp(part_lse - part_lse.max(dim=0).values)  # a rank holding none of a row's keys: weight 0
    return (weights[..., None] * parts).sum(0) / weights.sum(0)[..., None]
