"""Fault traces: a JSON Lines format for the failures a run injects, a validator, and a generator drawn from
published GPU failure statistics.

    python -m ft.fault_trace generate OUT.jsonl --tp-size 4 --window-s 120 --seed 0 [--acceleration X]
        [--min-live 1] [--repair-s 20 | --no-rejoin] [--hang-fraction 0.25] [--hang-s 10]
    python -m ft.fault_trace show TRACE.jsonl

Format (version 1). Line 1 is a header, every further line one event, times non-decreasing:

    {"format": "sglang-ft-fault-trace", "version": 1, "source": "...", "window_s": 120.0, "tp_size": 4,
     "seed": 0, "min_live": 1, "params": {...}}
    {"t_s": 12.345, "worker": 2, "event": "kill"}

- `t_s`: seconds from the start of the run, 0 <= t_s <= window_s.
- `worker`: the launch id of a worker, 0 .. tp_size-1 (the id `/ft/status` lists as `worker`), not its TP rank.
  Ranks are renumbered at every regroup (survivors close up, and which survivor becomes which rank is the
  planner's choice), so a rank names a different process before and after a failure, and a trace in ranks would
  mean something else under a different planner or after a different earlier event. A launch id names the same
  slot for the whole run; a replayer maps it to the current rank from `/ft/status` just before injecting. A
  `rejoin` restarts the same slot.
- `event`: what is done to the worker's process, with the state it moves the worker between:
  `kill` (SIGKILL; alive or hung -> dead), `hang` (SIGSTOP; alive -> hung), `resume` (SIGCONT; hung -> dead),
  `rejoin` (a fresh process in the slot; dead -> alive).
  A hang in this format is a failure, meant to outlast the server's failure detection (the generator holds it
  `hang_s`, 10 s by default, five times sglang-ft's default 2 s heartbeat timeout): the worker leaves the group,
  and when it is resumed it finds itself fenced (an older epoch) and exits, so it is dead until a `rejoin`.
- `min_live` (header): alive workers (not hung, not dead) never drop below it; a trace that does is invalid.
- `params` (header, optional): the generator's parameters, free-form, for the record.

Generator. Figures published in Dubey et al., "The Llama 3 Herd of Models" (2024), section 3.3.4 and its Table 5:
a 54-day snapshot of Llama 3 405B pre-training on 16,384 H100 GPUs had 466 job interruptions, 47 planned and 419
unexpected; GPU issues were 58.7% of the unexpected ones (largest categories: faulty GPU 30.1%, including NVLink
failures, and GPU HBM3 memory 17.2%; then GPU SRAM memory 4.5%, GPU system processor 4.1%). (The table's count for
faulty GPU, 148, is 35.3% of 419, not the 30.1% printed beside it; we use the published 58.7%, the lower rate.)

Per-GPU failure rate, assuming each GPU-related interruption is one GPU failing and all 16,384 GPUs were in the job
for all 54 days (fewer GPUs exposed would mean a higher rate):

    0.587 * 419 = 245.95 GPU failures
    16,384 GPUs * 54 days = 884,736 GPU-days = 7.644e10 GPU-seconds
    245.95 / 884,736 = 2.780e-4 failures per GPU-day  (one per 3,597 GPU-days, about 9.9 years)
    245.95 / 7.644e10 = 3.218e-9 failures per GPU-second

A real 8-GPU server would see about one GPU failure a year, so a test window is accelerated: every worker fails as a
Poisson process of rate 3.218e-9 * acceleration per second. The default acceleration, 2e6 (one second of the trace
stands for about 23 days of a GPU's life), gives 4 workers over 120 s 3.1 expected failures and 8 workers 6.2,
before the `min_live` floor and repair downtime thin them. A failure drawn for a worker that is not alive, or that
would leave fewer than `min_live` workers alive, is dropped (the process is memoryless, so the failures of a worker
while alive stay Poisson).

Assumed, not published: the paper reports root causes, not whether a process crashed or stopped answering. We take a
share `hang_fraction` (default 0.25) of failures as hangs and the rest as kills. Of the published GPU categories,
GPU system processor failures (4.1%) are the kind that leaves the device unresponsive, while memory errors (HBM3,
SRAM) are typically reported to the process as errors, which then dies; so hangs are taken as the minority, and
0.25 is chosen to exercise the hang path in short traces, not measured. A hung worker is resumed `hang_s` later; a
dead worker rejoins `repair_s` (default 20 s, a parameter, not a published repair time) after it died (after the
resume, for a hang). Events past the window are left out. Everything is drawn from `random.Random(seed)`: the same
arguments give the same trace.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ft.faults import PROCESS_FAULTS

FORMAT = "sglang-ft-fault-trace"
VERSION = 1
EVENTS = (*PROCESS_FAULTS, "rejoin")
# event -> (states it may be applied in, state it leaves the worker in)
TRANSITIONS = {
    "kill": (("alive", "hung"), "dead"),
    "hang": (("alive",), "hung"),
    "resume": (("hung",), "dead"),  # the resumed process is fenced and exits
    "rejoin": (("dead",), "alive"),
}

# Dubey et al., "The Llama 3 Herd of Models" (2024), section 3.3.4, Table 5
LLAMA3_GPUS = 16_384
LLAMA3_DAYS = 54
LLAMA3_UNEXPECTED_INTERRUPTIONS = 419
LLAMA3_GPU_SHARE = 0.587
GPU_FAILURES_PER_GPU_S = LLAMA3_UNEXPECTED_INTERRUPTIONS * LLAMA3_GPU_SHARE / (LLAMA3_GPUS * LLAMA3_DAYS * 86_400)
SOURCE = "Dubey et al. 2024, The Llama 3 Herd of Models, sec. 3.3.4: 0.587 * 419 GPU failures / (16384 GPUs * 54 d)"

DEFAULT_ACCELERATION = 2e6
DEFAULT_HANG_FRACTION = 0.25  # assumed
DEFAULT_HANG_S = 10.0
DEFAULT_REPAIR_S = 20.0


class TraceError(ValueError):
    """A malformed or inconsistent trace; the message names the file (when read from one), line and field."""

    def __init__(self, line: int, message: str, fieldname: str | None = None, path: str | None = None):
        self.line, self.message, self.field, self.path = line, message, fieldname, path
        where = (f"{path}: " if path else "") + f"line {line}" + (f", field '{fieldname}'" if fieldname else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class TraceHeader:
    source: str
    window_s: float
    tp_size: int
    seed: int | None
    min_live: int = 1
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FaultEvent:
    t_s: float
    worker: int
    event: str


@dataclass(frozen=True)
class FaultTrace:
    header: TraceHeader
    events: tuple[FaultEvent, ...]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _check_fields(obj, line: int, required: dict, optional: dict | None = None) -> None:
    """Every required field present and well-typed (in the order given), optional ones well-typed, no others."""
    optional = optional or {}
    if not isinstance(obj, dict):
        raise TraceError(line, f"expected a JSON object, got {type(obj).__name__}")
    for name, (check, want) in {**required, **optional}.items():
        if name not in obj:
            if name in required:
                raise TraceError(line, "missing", name)
        elif not check(obj[name]):
            raise TraceError(line, f"must be {want}, got {obj[name]!r}", name)
    for name in obj:
        if name not in required and name not in optional:
            hint = " (this format names workers by launch id: 'worker')" if name == "rank" else ""
            raise TraceError(line, f"unknown field{hint}", name)


HEADER_FIELDS = {
    "format": (lambda v: v == FORMAT, repr(FORMAT)),
    "version": (lambda v: v == VERSION, f"{VERSION} (the version this reader knows)"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "window_s": (lambda v: _is_number(v) and v > 0, "a positive number of seconds"),
    "tp_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "seed": (lambda v: v is None or _is_int(v), "an integer or null"),
    "min_live": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
}
EVENT_FIELDS = {
    "t_s": (lambda v: _is_number(v) and v >= 0, "a non-negative number of seconds"),
    "worker": (_is_int, "an integer launch id"),
    "event": (lambda v: v in EVENTS, "one of " + ", ".join(EVENTS)),
}


def validate(trace: FaultTrace) -> None:
    """Raise TraceError unless the trace is consistent; event i is on line i + 2 of its file."""
    h = trace.header
    if h.min_live > h.tp_size:
        raise TraceError(1, f"{h.min_live} exceeds tp_size {h.tp_size}", "min_live")
    state = ["alive"] * h.tp_size
    last_t = 0.0
    for i, e in enumerate(trace.events):
        line = i + 2
        if e.t_s < last_t:
            raise TraceError(line, f"{e.t_s} is earlier than the previous event's {last_t}", "t_s")
        if e.t_s > h.window_s:
            raise TraceError(line, f"{e.t_s} is past the window of {h.window_s} s", "t_s")
        if not 0 <= e.worker < h.tp_size:
            raise TraceError(line, f"{e.worker} is not a launch id in 0..{h.tp_size - 1}", "worker")
        allowed, after = TRANSITIONS[e.event]
        if state[e.worker] not in allowed:
            raise TraceError(line, f"cannot {e.event} worker {e.worker}: it is {state[e.worker]} "
                                   f"({e.event} needs {' or '.join(allowed)})", "event")
        state[e.worker] = after
        alive = state.count("alive")
        if alive < h.min_live:
            raise TraceError(line, f"{e.event} of worker {e.worker} leaves {alive} workers alive, "
                                   f"fewer than min_live {h.min_live}", "event")
        last_t = e.t_s


def parse_trace(text: str) -> FaultTrace:
    """Parse and validate the text of a trace file."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise TraceError(1, "empty trace: the first line must be the header")
    objs = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            raise TraceError(number, "blank line inside the trace")
        try:
            objs.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise TraceError(number, f"not JSON: {exc.msg} at column {exc.colno}") from None
    head = objs[0]
    if isinstance(head, dict) and "format" not in head and "event" in head:
        raise TraceError(1, "missing (the first line must be the header, not an event)", "format")
    _check_fields(head, 1, {k: v for k, v in HEADER_FIELDS.items() if k != "min_live"},
                  {"min_live": HEADER_FIELDS["min_live"], "params": (lambda v: isinstance(v, dict), "an object")})
    header = TraceHeader(head["source"], float(head["window_s"]), head["tp_size"], head["seed"],
                         head.get("min_live", 1), head.get("params", {}))
    events = []
    for number, obj in enumerate(objs[1:], start=2):
        _check_fields(obj, number, EVENT_FIELDS)
        events.append(FaultEvent(float(obj["t_s"]), obj["worker"], obj["event"]))
    trace = FaultTrace(header, tuple(events))
    validate(trace)
    return trace


def dumps_trace(trace: FaultTrace) -> str:
    h = trace.header
    head = {"format": FORMAT, "version": VERSION, **asdict(h)}
    lines = [json.dumps(head)] + [json.dumps(asdict(e)) for e in trace.events]
    return "\n".join(lines) + "\n"


def load_trace(path: str | Path) -> FaultTrace:
    """Read and validate a trace file; errors name the file, line and field."""
    try:
        return parse_trace(Path(path).read_text())
    except TraceError as exc:
        raise TraceError(exc.line, exc.message, exc.field, str(path)) from None


def save_trace(path: str | Path, trace: FaultTrace) -> None:
    """Validate, then write a trace as JSON Lines."""
    validate(trace)
    Path(path).write_text(dumps_trace(trace))


def expected_failures(tp_size: int, window_s: float, acceleration: float = DEFAULT_ACCELERATION) -> float:
    """Failures `tp_size` always-alive workers see in the window (before the min_live floor and downtime)."""
    return tp_size * window_s * GPU_FAILURES_PER_GPU_S * acceleration


def generate(tp_size: int, window_s: float, seed: int, acceleration: float = DEFAULT_ACCELERATION,
             min_live: int = 1, repair_s: float | None = DEFAULT_REPAIR_S,
             hang_fraction: float = DEFAULT_HANG_FRACTION, hang_s: float = DEFAULT_HANG_S) -> FaultTrace:
    """Draw a trace: each worker fails as a Poisson process while alive; see the module docstring."""
    if not (tp_size >= 1 and window_s > 0 and acceleration > 0 and 0 <= min_live <= tp_size
            and 0 <= hang_fraction <= 1 and hang_s >= 0 and (repair_s is None or repair_s >= 0)):
        raise ValueError("need tp_size >= 1, window_s > 0, acceleration > 0, 0 <= min_live <= tp_size, "
                         "0 <= hang_fraction <= 1, hang_s >= 0, repair_s >= 0 or None")
    rng = random.Random(seed)
    rate = GPU_FAILURES_PER_GPU_S * acceleration
    candidates = []  # (t, worker, is_hang), every worker's failure times over the whole window
    for worker in range(tp_size):
        t = rng.expovariate(rate)
        while t <= window_s:
            candidates.append((t, worker, rng.random() < hang_fraction))
            t += rng.expovariate(rate)
    candidates.sort()
    state = ["alive"] * tp_size
    scheduled: list[tuple[float, int, int, str]] = []  # (t, order, worker, event): resumes and rejoins
    order = itertools.count()
    events: list[FaultEvent] = []

    def emit(t: float, worker: int, event: str) -> None:
        state[worker] = TRANSITIONS[event][1]
        events.append(FaultEvent(min(round(t, 3), window_s), worker, event))  # milliseconds, monotone

    def later(t: float, worker: int, event: str) -> None:
        if t <= window_s:
            heapq.heappush(scheduled, (t, next(order), worker, event))

    for t, worker, is_hang in candidates + [(math.inf, -1, False)]:
        while scheduled and scheduled[0][0] <= t:
            t_due, _, w, event = heapq.heappop(scheduled)
            emit(t_due, w, event)
            if event == "resume" and repair_s is not None:
                later(t_due + repair_s, w, "rejoin")
        if worker < 0 or state[worker] != "alive" or state.count("alive") - 1 < min_live:
            continue
        if is_hang:
            emit(t, worker, "hang")
            later(t + hang_s, worker, "resume")
        else:
            emit(t, worker, "kill")
            if repair_s is not None:
                later(t + repair_s, worker, "rejoin")
    params = {"acceleration": acceleration, "gpu_failures_per_gpu_s": GPU_FAILURES_PER_GPU_S,
              "hang_fraction": hang_fraction, "hang_s": hang_s, "repair_s": repair_s}
    trace = FaultTrace(TraceHeader(SOURCE, float(window_s), tp_size, seed, min_live, params), tuple(events))
    validate(trace)
    return trace


def format_table(trace: FaultTrace) -> str:
    """A readable table: each event with the workers alive after it."""
    h = trace.header
    out = [f"{FORMAT} v{VERSION}: window {h.window_s:g} s, tp_size {h.tp_size}, seed {h.seed}, "
           f"min_live {h.min_live}", f"source: {h.source}"]
    if h.params:
        out.append("params: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in h.params.items()))
    out.append(f"{'t_s':>9}  {'worker':>6}  {'event':<7} alive after")
    state = ["alive"] * h.tp_size
    for e in trace.events:
        state[e.worker] = TRANSITIONS[e.event][1]
        alive = [str(w) for w, s in enumerate(state) if s == "alive"]
        out.append(f"{e.t_s:9.3f}  {e.worker:>6}  {e.event:<7} {','.join(alive) or '-'}")
    counts = {k: sum(e.event == k for e in trace.events) for k in EVENTS}
    out.append(f"{len(trace.events)} events: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ft.fault_trace", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="draw a trace from the Llama 3 GPU failure rate")
    gen.add_argument("out")
    gen.add_argument("--tp-size", type=int, required=True)
    gen.add_argument("--window-s", type=float, required=True)
    gen.add_argument("--seed", type=int, required=True)
    gen.add_argument("--acceleration", type=float, default=DEFAULT_ACCELERATION)
    gen.add_argument("--min-live", type=int, default=1)
    rejoin = gen.add_mutually_exclusive_group()
    rejoin.add_argument("--repair-s", type=float, default=DEFAULT_REPAIR_S)
    rejoin.add_argument("--no-rejoin", action="store_true", help="dead workers never come back")
    gen.add_argument("--hang-fraction", type=float, default=DEFAULT_HANG_FRACTION)
    gen.add_argument("--hang-s", type=float, default=DEFAULT_HANG_S)
    show = sub.add_parser("show", help="print a trace as a table (validates it)")
    show.add_argument("trace")
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            print(format_table(load_trace(args.trace)))
            return 0
        trace = generate(args.tp_size, args.window_s, args.seed, args.acceleration, args.min_live,
                         None if args.no_rejoin else args.repair_s, args.hang_fraction, args.hang_s)
    except (TraceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_trace(args.out, trace)
    expected = expected_failures(args.tp_size, args.window_s, args.acceleration)
    print(f"wrote {args.out}: {len(trace.events)} events "
          f"({expected:.1f} failures expected before the min_live floor and downtime)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
