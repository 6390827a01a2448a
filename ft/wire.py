"""The bounds every message on sglang-ft's own sockets is decoded against, and what a loop does with one that fails.

Fields are declared with these bounded types, so msgspec refuses a frame whose ids, counts or lengths are out of
range while it decodes it, before any receiver sees it (a length is checked from the array's header, before its
items are read). What depends on the receiver's own state (the backup store's geometry, a group's workers) is
checked where that state lives and raises `Malformed`. Either way the loop counts the message and drops it; and
since no check is ever complete, each loop also catches `Exception` around the handling of one message
(`Dropped.failed`), never around itself.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from msgspec import Meta

MAX_WORKERS = 1 << 12  # worker ids (launch TP ranks) of one group
MAX_PID = 1 << 22  # Linux's largest pid_max
MAX_KV_SLOTS = 1 << 31  # token slots of one KV pool (SGLang indexes them with int32 on the device)
MAX_LAYERS = 1 << 10
MAX_KV_HEADS = 1 << 12  # the whole group's KV heads
MAX_HEAD_DIM = 1 << 12
MAX_RIDS = 1 << 16  # requests one message names (a batch's)
MAX_RID_CHARS = 1 << 12  # a request id (SGLang's are 32 hex digits; a client may choose its own)
MAX_TEXT = 1 << 20  # a free-text field: a failure's cause, a layout's JSON
MAX_STAGES = 64  # named stage timings of one regroup

Epoch = Annotated[int, Meta(ge=-1, le=1 << 62)]  # -1: a restarted worker not yet planned into a group
Count = Annotated[int, Meta(ge=0, le=1 << 62)]  # counters, sequence numbers, bytes
Worker = Annotated[int, Meta(ge=0, lt=MAX_WORKERS)]
Pid = Annotated[int, Meta(ge=1, le=MAX_PID)]  # never 0 or negative: os.kill would signal a whole process group
PidOrUnknown = Annotated[int, Meta(ge=0, le=MAX_PID)]  # 0: not known
Slot = Annotated[int, Meta(ge=0, le=MAX_KV_SLOTS)]  # a slot index, a position, a number of slots
Rid = Annotated[str, Meta(max_length=MAX_RID_CHARS)]
Rids = Annotated[tuple[Rid, ...], Meta(max_length=MAX_RIDS)]
Positions = Annotated[tuple[Slot, ...], Meta(max_length=MAX_RIDS)]  # one per rid
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Workers = Annotated[tuple[Worker, ...], Meta(max_length=MAX_WORKERS)]


class Malformed(ValueError):
    """A decoded message that breaks a rule of its receiver (e.g. a slot beyond the store's pool)."""


class Dropped:
    """What one loop dropped: `malformed` messages, and of those the `failed` ones (their handling raised: a rule no
    check caught). Counted into `counts` (a dict the loop reports, e.g. the backup store's counters); logged the
    first time and then at most once per `interval_s`, so a flood of forged messages cannot flood the log."""

    def __init__(self, logger: logging.Logger, loop: str, counts: dict | None = None, interval_s: float = 10.0):
        self.logger, self.loop, self.interval_s = logger, loop, interval_s
        self.counts = {"malformed": 0, "failed": 0} if counts is None else counts
        self._logged_at: float | None = None

    @property
    def malformed(self) -> int:
        return self.counts["malformed"]

    @property
    def failed(self) -> int:
        return self.counts["failed"]

    def refused(self, why: str) -> None:
        self.counts["malformed"] += 1
        self._warn("%s: dropped a malformed message (%s); %d so far", self.loop, why, self.malformed)

    def raised(self, exc: BaseException) -> None:
        self.counts["malformed"] += 1
        self.counts["failed"] += 1
        self._warn("%s: dropped a message whose handling raised %s: %.200s; %d so far", self.loop,
                   type(exc).__name__, exc, self.failed)

    def _warn(self, text: str, *args) -> None:
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.interval_s:
            self._logged_at = now
            self.logger.warning(text, *args)
