"""What the ranks of a group learn from each other over its CPU (gloo) channel: every rank's object, or whether any
rank says yes. The regroup's stages and a moved request's KV take-over agree this way before acting alike."""

from __future__ import annotations

import pickle

SLOT_BYTES = 16 << 10  # an object that pickles to this or less travels in one all-gather (the regroup's: < 2 KB)
_LENGTH_BYTES = 8


def all_gather_object(mine, group) -> list:
    """Every rank's `mine`, in rank order, over `group` (a CPU group: the tensors are host tensors).

    One all-gather of a fixed slot per rank when every rank's pickle fits in `SLOT_BYTES`; a second, sized to the
    largest, only when one does not (each slot starts with its pickle's length, so every rank takes the same
    branch). torch's `all_gather_object` always spends two collectives (the sizes, then the data) and more
    bookkeeping: 5.5-6 ms against 2.7 for three gloo processes on this machine's 2 cores, and a regroup agrees
    this way several times while every stream waits."""
    import torch
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
    size = dist.get_world_size(group)
    slot = torch.zeros(_LENGTH_BYTES + SLOT_BYTES, dtype=torch.uint8)
    slot[:_LENGTH_BYTES] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    if len(data) <= SLOT_BYTES:
        slot[_LENGTH_BYTES:_LENGTH_BYTES + len(data)] = data
    slots = [torch.empty_like(slot) for _ in range(size)]
    dist.all_gather(slots, slot, group=group)
    lengths = [int(s[:_LENGTH_BYTES].view(torch.int64)) for s in slots]
    if max(lengths) <= SLOT_BYTES:
        return [pickle.loads(s[_LENGTH_BYTES:_LENGTH_BYTES + n].numpy().tobytes()) for s, n in zip(slots, lengths)]
    whole = torch.zeros(max(lengths), dtype=torch.uint8)
    whole[:len(data)] = data
    wholes = [torch.empty_like(whole) for _ in range(size)]
    dist.all_gather(wholes, whole, group=group)
    return [pickle.loads(w[:n].numpy().tobytes()) for w, n in zip(wholes, lengths)]


def any_rank(flag: bool, cpu_group) -> bool:
    """True on every rank if `flag` is true on any."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(int(flag))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=cpu_group)
    return bool(tensor.item())
