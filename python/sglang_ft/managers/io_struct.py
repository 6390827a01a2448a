"""Messages between sglang-ft's parts in SGLang's processes (as SGLang's `managers/io_struct.py` holds its own).

The tokenizer manager's journal sends them on SGLang's own channel to the schedulers (pickled, the way SGLang wraps
objects it does not know); SGLang's DP controller hands a message to every replica, so each carries the replica it is
for. The FT runtime's messages (controller, workers, backup store) are `ft.messages`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ReceivedTokens:
    """From the tokenizer manager to a newly elected rank 0: output tokens received per unfinished request
    (scheduler_components/output_rewind.py)."""

    epoch: int
    received: dict[str, int]
    dp_rank: int = 0  # the data-parallel replica it is for (SGLang's DP controller hands it to every replica)


@dataclasses.dataclass
class ResumeTokens:
    """From the tokenizer manager to replica `dp_rank`: request `rid`, arriving next, has produced `output_ids`
    (scheduler_components/replica_move.py)."""

    rid: str
    output_ids: list[int]
    dp_rank: int
    kv_endpoint: str | None = None  # the lost replica's backup store
    kv_slots: list[int] = dataclasses.field(default_factory=list)  # its slots of the first tokens, in order


@dataclasses.dataclass
class RenewReplicaSocket:
    """From the tokenizer manager to SGLang's DP controller: replica `dp_rank` has a new rank 0; drop the old one's
    connection (data_parallel_controller_components/replica_outbox.py)."""

    dp_rank: int


def split_messages(messages, kind: type) -> tuple[list, list]:
    """Separate the journal's messages of type `kind` from the rest (SGLang's dispatcher must see its own alone)."""
    return [m for m in messages if isinstance(m, kind)], [m for m in messages if not isinstance(m, kind)]


def split_received_tokens(messages) -> tuple[list[ReceivedTokens], list]:
    return split_messages(messages, ReceivedTokens)


def split_resume_tokens(messages) -> tuple[list[ResumeTokens], list]:
    return split_messages(messages, ResumeTokens)


def for_replica(messages, dp_rank: int):
    """`messages` without the journal's messages meant for another replica."""
    if not messages:
        return messages
    return [m for m in messages if not isinstance(m, (ReceivedTokens, ResumeTokens)) or m.dp_rank == dp_rank]
