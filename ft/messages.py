"""Typed messages on sglang-ft's own ZMQ sockets (msgspec msgpack), each carrying the membership epoch.

A receiver decodes with `decode()`, which rejects anything that is not one of these structs, so a malformed or
foreign frame is an error value, never an exception deep inside a loop.
"""

from __future__ import annotations

import msgspec


class WorkerLoad(msgspec.Struct, frozen=True):
    """What one worker holds and does, for `/ft/status`: unequal heads mean unequal KV bytes and attention work."""

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

    worker: int  # the worker's id: its TP rank at launch, stable across regroups
    pid: int
    epoch: int
    seq: int
    kv_backup: tuple[int, int, int] | None = None  # (messages sent, dropped on a full queue, bytes sent)
    joining: bool = False  # a restarted worker, initialised and waiting to be planned back into the group
    kv_slots: int = 0  # token slots of the worker's KV pool (every member has the same; a joiner needs it)
    kv_backup_queued: int = 0  # KV backup messages handed to ZMQ not yet written out (`KvBackupSender.queued`)
    serving: bool = False  # has finished a batch: judged by the heartbeat timeout from then on, by the startup one before
    load: WorkerLoad | None = None
    # how long its current scheduler iteration with work has run (0 between them and while idle): a survivor
    # blocked in a collective on a hung peer reports a growing value, which confirms the hang (failure_detector.py)
    step_running_s: float = 0.0


class WorkerFailed(msgspec.Struct, tag=True, frozen=True):
    """A worker reports that a collective failed or timed out (a peer is probably gone)."""

    worker: int
    epoch: int
    reason: str
    pid: int = 0


class Regroup(msgspec.Struct, tag=True, frozen=True):
    """The controller's order: form the group `workers` (new rank r = workers[r]) at `epoch`.

    `layout_json` is the controller's plan; the members plan again from what each of them actually holds (a
    regroup interrupted by another failure can leave them in different states) and report the layout they formed.
    `joining` are restarted workers that have no scheduler state yet; `pids[r]` is the process of `workers[r]` (0
    where not known), so the backup store can tell a member's late writes from a fenced process's. A store the
    controller knows is down is not asked (`kv_store_alive`): the fetch would wait out its timeout first.
    """

    epoch: int
    workers: tuple[int, ...]
    layout_json: str
    store_port: int
    cause: str
    joining: tuple[int, ...] = ()
    pids: tuple[int, ...] = ()
    kv_store_alive: bool = True  # False: the backup store is down, the lost heads' KV is recomputed without waiting


class Respawn(msgspec.Struct, tag=True, frozen=True):
    """The controller asks the launcher to start worker `worker` again, with a KV pool of `kv_slots` token slots."""

    worker: int
    epoch: int
    kv_slots: int
    attempt: int = 1


class Fenced(msgspec.Struct, tag=True, frozen=True):
    """The controller's answer to a worker of an older epoch: the process `pid` of worker `worker` is out of the
    group and must exit (a restarted process of the same worker is not; pid 0 means any process of it)."""

    worker: int
    epoch: int
    pid: int = 0


class BackupResync(msgspec.Struct, tag=True, frozen=True):
    """The controller restarted the KV backup store: every worker re-sends the KV it holds to the new one."""

    epoch: int
    store_pid: int


class RegroupDone(msgspec.Struct, tag=True, frozen=True):
    """A worker finished its part of the regroup to `epoch`, with what it moved and how long each stage took."""

    worker: int
    epoch: int
    stage_ms: dict[str, float]
    bytes_kept: int
    bytes_p2p: int
    bytes_reloaded: int
    kv_tokens_recomputed: int
    kv_blocks_restored: int = 0  # from the backup store
    kv_bytes_p2p: int = 0  # KV received from peers
    pid: int = 0
    layout_json: str = ""  # the layout the group formed (every member reports the same)
    expert_bytes_moved: int = 0  # MoE: expert weights received from peers or disk (part of bytes_p2p + reloaded)


class GroupLost(msgspec.Struct, tag=True, frozen=True):
    """The controller has no worker left that holds the model: this TP group (a data-parallel replica, under
    `--dp-size`) serves nothing more, and its unfinished requests must go on elsewhere."""

    epoch: int
    cause: str


def msgpack_codec(union):
    """(encode, decode) for a union of tagged structs; decode returns None for anything not one of them."""
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(union)

    def decode(frame: bytes):
        try:
            return decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    return encoder.encode, decode


Message = Heartbeat | WorkerFailed | Regroup | Respawn | Fenced | BackupResync | RegroupDone | GroupLost
encode, decode = msgpack_codec(Message)


class ControlRequest(msgspec.Struct, frozen=True):
    """HTTP server -> controller: `status`; `inject` a fault (`kill`, `hang`, `resume`) into TP rank `rank`;
    `rejoin` the dead worker `worker` (its launch TP rank)."""

    op: str
    rank: int = -1
    kind: str = ""
    worker: int = -1


_control_decoder = msgspec.json.Decoder(ControlRequest)


def encode_control(request: ControlRequest) -> bytes:
    return msgspec.json.encode(request)


def decode_control(frame: bytes) -> ControlRequest | None:
    try:
        return _control_decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
