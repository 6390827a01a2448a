"""Typed messages on sglang-ft's own ZMQ sockets (msgspec msgpack), each carrying the membership epoch.

A receiver decodes with its channel's decoder (`decode_report` on the controller's PULL socket, `decode_order` on
its PUB socket's subscribers), which rejects anything that is not one of that channel's structs or breaks a bound
of `ft.wire`, so a malformed or foreign frame is an error value, never an exception deep inside a loop.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from ft.wire import (
    MAX_KV_SLOTS,
    MAX_STAGES,
    MAX_WORKERS,
    Count,
    Epoch,
    Pid,
    PidOrUnknown,
    Slot,
    Text,
    Worker,
    Workers,
)

Ms = Annotated[float, Meta(ge=0)]  # a duration or a sum of them


class WorkerLoad(msgspec.Struct, frozen=True):
    """What one worker holds and does, for `/ft/status`: unequal heads mean unequal KV bytes and attention work.

    Unbounded on purpose: only shown, never used to index or allocate, and a bound that a real value broke (a
    subtraction of two clocks) would drop the heartbeat carrying it, and the controller would declare the worker dead.
    """

    q_heads: int
    kv_heads: int
    kv_tokens_used: int  # token slots allocated (running requests and the radix cache)
    kv_tokens_free: int
    kv_bytes_per_token: int  # this worker's KV for one token: its KV heads, every layer, K and V
    running_requests: int
    waiting_requests: int
    outstanding_tokens: int  # prompt tokens not yet prefilled plus output tokens not yet decoded
    last_step_ms: float  # the latest forward (SGLang's run_batch) on this worker
    last_step_collective_ms: float | None = None  # of which inside TP collectives: waiting for wider peers (CPU)
    steps: int = 0  # forwards since the worker started
    busy_ms_total: float = 0.0  # their time outside TP collectives (CPU): this worker's own work, summed
    # hybrid attention or cyclic placement: the remainder heads this worker computes and holds KV for
    remainder_kv_heads: int = 0
    remainder_requests: int = 0  # unfinished requests it owns
    remainder_kv_tokens_used: int = 0
    remainder_kv_bytes_per_token: int = 0
    remainder_rows_copied: int = 0  # cached-prefix rows received from the worker that computed them
    remainder_kv_tokens_capacity: int = 0  # rows its remainder pool has room for (allocated)

    @property
    def kv_bytes_used(self) -> int:
        """The KV bytes this worker holds: its TP heads' rows and its remainder rows (hybrid or cyclic)."""
        return (self.kv_tokens_used * self.kv_bytes_per_token
                + self.remainder_kv_tokens_used * self.remainder_kv_bytes_per_token)


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    """Sent by each worker's heartbeat thread every interval."""

    worker: Worker  # the worker's id: its TP rank at launch, stable across regroups
    pid: Pid
    epoch: Epoch
    seq: Count
    kv_backup: tuple[Count, Count, Count] | None = None  # (messages sent, dropped on a full queue, bytes sent)
    joining: bool = False  # a restarted worker, initialised and waiting to be planned back into the group
    kv_slots: Slot = 0  # token slots of the worker's KV pool (every member has the same; a joiner needs it)
    kv_backup_queued: Count = 0  # KV backup messages handed to ZMQ not yet written out (`KvBackupSender.queued`)
    serving: bool = False  # has finished a batch: judged by the heartbeat timeout from then on, by the startup one before
    load: WorkerLoad | None = None
    # how long its current scheduler iteration with work has run (0 between them and while idle): a survivor
    # blocked in a collective on a hung peer reports a growing value, which confirms the hang (failure_detector.py)
    step_running_s: float = 0.0


class WorkerFailed(msgspec.Struct, tag=True, frozen=True):
    """A worker reports that a collective failed or timed out (a peer is probably gone)."""

    worker: Worker
    epoch: Epoch
    reason: Text
    pid: PidOrUnknown = 0


class Regroup(msgspec.Struct, tag=True, frozen=True):
    """The controller's order: form the group `workers` (new rank r = workers[r]) at `epoch`.

    The members plan the migration themselves, from what each of them actually holds (a regroup interrupted by
    another failure can leave them in states the controller cannot know), and report the layout they formed.
    `joining` are restarted workers that have no scheduler state yet; `pids[r]` is the process of `workers[r]` (0
    where not known), so the backup store can tell a member's late writes from a fenced process's. A store the
    controller knows is down is not asked (`kv_store_alive`): the fetch would wait out its timeout first.
    """

    epoch: Epoch
    workers: Workers
    store_port: Annotated[int, Meta(ge=0, le=65535)]
    cause: Text
    joining: Workers = ()
    pids: Annotated[tuple[PidOrUnknown, ...], Meta(max_length=MAX_WORKERS)] = ()
    kv_store_alive: bool = True  # False: the backup store is down, the lost heads' KV is recomputed without waiting

    def __post_init__(self):
        if not self.workers or len(set(self.workers)) != len(self.workers):
            raise ValueError(f"a group of distinct workers, not {self.workers}")
        if not set(self.joining) <= set(self.workers) or len(self.pids) not in (0, len(self.workers)):
            raise ValueError("joiners outside the group, or not one pid per worker")


class Respawn(msgspec.Struct, tag=True, frozen=True):
    """The controller asks the launcher to start worker `worker` again, with a KV pool of `kv_slots` token slots."""

    worker: Worker
    epoch: Epoch
    kv_slots: Annotated[int, Meta(ge=1, le=MAX_KV_SLOTS)]
    attempt: Count = 1


class Fenced(msgspec.Struct, tag=True, frozen=True):
    """The controller's answer to a worker of an older epoch: the process `pid` of worker `worker` is out of the
    group and must exit (a restarted process of the same worker is not; pid 0 means any process of it)."""

    worker: Worker
    epoch: Epoch
    pid: PidOrUnknown = 0


class BackupResync(msgspec.Struct, tag=True, frozen=True):
    """The controller restarted the KV backup store: every worker re-sends the KV it holds to the new one."""

    epoch: Epoch
    store_pid: PidOrUnknown


class RegroupDone(msgspec.Struct, tag=True, frozen=True):
    """A worker finished its part of the regroup to `epoch`, with what it moved and how long each stage took."""

    worker: Worker
    epoch: Epoch
    stage_ms: Annotated[dict[Annotated[str, Meta(max_length=64)], Ms], Meta(max_length=MAX_STAGES)]
    bytes_kept: Count
    bytes_p2p: Count
    bytes_reloaded: Count
    kv_tokens_recomputed: Count
    kv_blocks_restored: Count = 0  # from the backup store
    kv_bytes_p2p: Count = 0  # KV received from peers
    pid: PidOrUnknown = 0
    layout_json: Text = ""  # the layout the group formed (every member reports the same)
    expert_bytes_moved: Count = 0  # MoE: expert weights received from peers or disk (part of bytes_p2p + reloaded)
    bytes_from_host_cache: Count = 0  # slices read from the node's copy of the checkpoint in host memory, not disk


class LateStageDone(msgspec.Struct, tag=True, frozen=True):
    """A stage of the recovery to `epoch` that ends after serving resumed (the device graphs' re-capture, done
    between steps): the controller adds it to that recovery's stages."""

    worker: Worker
    epoch: Epoch
    stage: Annotated[str, Meta(max_length=64)]
    ms: Ms
    pid: PidOrUnknown = 0


class GroupLost(msgspec.Struct, tag=True, frozen=True):
    """The controller has no worker left that holds the model: this TP group (a data-parallel replica, under
    `--dp-size`) serves nothing more, and its unfinished requests must go on elsewhere."""

    epoch: Epoch
    cause: Text


def msgpack_codec(union):
    """(encode, decode) for a union of tagged structs; decode returns None for anything not one of them."""
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(union)

    def decode(frame: bytes):
        try:
            return decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    return encoder.encode, decode


Report = Heartbeat | WorkerFailed | RegroupDone | LateStageDone  # workers -> the controller's PULL socket
Order = Regroup | Respawn | Fenced | BackupResync | GroupLost  # the controller's PUB socket -> its subscribers
Message = Report | Order
encode, decode = msgpack_codec(Message)
_, decode_report = msgpack_codec(Report)
_, decode_order = msgpack_codec(Order)


class ControlRequest(msgspec.Struct, frozen=True):
    """HTTP server -> controller: `status`; `inject` a fault (`kill`, `hang`, `resume`) into TP rank `rank`;
    `rejoin` the dead worker `worker` (its launch TP rank)."""

    op: Annotated[str, Meta(max_length=64)]
    rank: int = -1  # (ranges checked by the controller, which answers why)
    kind: Annotated[str, Meta(max_length=64)] = ""
    worker: int = -1
    after: int = 0  # `events`: the last event id the HTTP server has (ft/events.py)


_control_decoder = msgspec.json.Decoder(ControlRequest)


def encode_control(request: ControlRequest) -> bytes:
    return msgspec.json.encode(request)


def decode_control(frame: bytes) -> ControlRequest | None:
    try:
        return _control_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
