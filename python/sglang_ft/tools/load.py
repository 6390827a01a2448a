"""Loads of streaming greedy requests, shared by the demo and the benchmarks: closed loop (`Load`) and open loop
(`OpenLoad`).

`Load`: each client sends a request, reads its stream to the end and sends the next; an attempt that fails
(connection refused, stream cut, an error chunk) is re-sent, as a real client would, and counted. The load records
when every token arrived, so throughput over time, the pause a failure causes and how fast it comes back can be
read off afterwards; with `expected` it also checks every completed output against a reference. With
`stagger_tokens`, client i asks for that many tokens fewer per i, so the clients drift apart instead of prefilling
and finishing in lockstep (which leaves the server idle between rounds).

`OpenLoad`: requests arrive on a fixed schedule (`arrival_times`: Poisson or evenly spaced, seeded) whatever the
server does, each on its own thread, re-sent after a failed attempt like `Load`'s; one `RequestRecord` per request
(arrival, first token, completion, tokens, failed attempts, lost).
"""

from __future__ import annotations

import bisect
import copy
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import requests


class ClientThreads:
    """Closed-loop clients on threads: `client(i)` runs until `stop` is set (it finishes the request in flight)."""

    stop: threading.Event
    threads: list[threading.Thread]

    def client(self, index: int) -> None:
        raise NotImplementedError

    def start(self, clients: int):
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()
        return self

    def finish(self, timeout_s: float = 180.0) -> None:
        """Stop sending new requests; the ones in flight are read to their end (or counted unfinished)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout_s)


@dataclass
class Load(ClientThreads):
    url: str
    prompts: list[str]
    max_new_tokens: int
    expected: dict[str, list[int]] | None = None  # prompt -> reference greedy token ids (max_new_tokens of them)
    stagger_tokens: int = 0  # client i asks for max_new_tokens - i * stagger_tokens (at least 1)
    tokens: list[float] = field(default_factory=list)  # arrival time of every streamed token
    completed: int = 0
    mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # (prompt, got, expected)
    failed_attempts: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (time.monotonic(), why) of each failed attempt
    unfinished: int = 0  # accepted by a client but not completed when the load stopped
    durations: list[float] = field(default_factory=list)  # seconds from first send to the end, per completed request
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def mismatched(self) -> int:
        """Completed requests whose tokens differed from `expected`."""
        return len(self.mismatches)

    def client(self, index: int) -> None:
        n = index
        max_new_tokens = max(1, self.max_new_tokens - index * self.stagger_tokens)
        while not self.stop.is_set():
            if self._one(self.prompts[n % len(self.prompts)], max_new_tokens):
                n += 1

    def _one(self, prompt: str, max_new_tokens: int) -> bool:
        """One request until it completes; a failed attempt is retried (re-sent) until the load stops."""
        body = {"text": prompt, "stream": True,
                "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": max_new_tokens}}
        first_sent = time.monotonic()
        while True:
            try:
                output_ids = self._stream(body)
                with self.lock:
                    self.completed += 1
                    self.durations.append(time.monotonic() - first_sent)
                    if self.expected is not None and output_ids != self.expected[prompt][:max_new_tokens]:
                        self.mismatches.append((prompt, output_ids, self.expected[prompt][:max_new_tokens]))
                return True
            except (requests.RequestException, RuntimeError, ValueError) as exc:
                with self.lock:
                    self.failed_attempts += 1
                    self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:300]))
                if self.stop.is_set():
                    with self.lock:
                        self.unfinished += 1
                    return False
                time.sleep(0.2)

    def _stream(self, body: dict) -> list[int]:
        def on_tokens(n: int, now: float) -> None:
            with self.lock:
                self.tokens.extend([now] * n)

        output_ids = stream_generate(self.url, body, on_tokens)
        if len(output_ids) < body["sampling_params"]["max_new_tokens"]:
            raise RuntimeError("stream ended early")
        return output_ids

    def tokens_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(start <= t < end for t in self.tokens)


def server_load(url: str, since: float | None = None, timeout_s: float = 30.0) -> dict:
    """The TP group's `/v1/loads` snapshot, published at or after `since` (time.time(); default: this call). SGLang
    publishes one after each prefill, every 15th decode step and on idle, so a plain read can predate what the
    caller just did."""
    since = time.time() if since is None else since
    deadline = time.monotonic() + timeout_s
    while True:
        load = requests.get(f"{url}/v1/loads", timeout=30).json()["loads"][0]
        if load["timestamp"] >= since:
            return load
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url}/v1/loads: nothing published in {timeout_s:.0f} s (last {load['timestamp']})")
        time.sleep(0.05)


def longest_gap(times: list[float], since: float, until: float | None = None) -> float:
    """The longest time with no token arriving between `since` and `until` (default: the last token): the longest
    stall a load with requests always in flight saw."""
    inside = sorted(t for t in times if t >= since and (until is None or t <= until))
    edges = [since, *inside] + ([until] if until is not None else [])
    return max((b - a for a, b in zip(edges, edges[1:])), default=0.0)


def stream_generate(url: str, body: dict, on_tokens: Callable[[int, float], None],
                    timeout: tuple[float, float] = (2, 120)) -> list[int]:
    """POST a streaming `/generate` and read it to the end; `on_tokens(n, now)` for every chunk bringing n new
    tokens. Returns the output ids; raises on a refused connection, an HTTP error, a cut stream or an error chunk."""
    seen, output_ids = 0, []
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            output_ids = chunk.get("output_ids", [])
            if len(output_ids) > seen:
                on_tokens(len(output_ids) - seen, time.monotonic())
            seen = max(seen, len(output_ids))
    return output_ids


def arrival_times(rate: float, window_s: float, seed: int, process: str = "poisson") -> list[float]:
    """Send times (seconds from the start) of an open-loop load of `rate` requests/s over `window_s`: a Poisson
    process drawn from `random.Random(seed)`, or `uniform`, evenly spaced (1/rate apart, the first at 0)."""
    if not (rate > 0 and window_s > 0):
        raise ValueError("rate and window_s must be positive")
    if process == "uniform":
        return [i / rate for i in range(int(window_s * rate - 1e-9) + 1) if i / rate < window_s]
    if process != "poisson":
        raise ValueError(f"process must be poisson or uniform, got {process!r}")
    rng, out, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < window_s:
        out.append(t)
    return out


@dataclass
class RequestRecord:
    """One request of an open-loop load. Times are time.monotonic(); first_token, done, tokens and token_times are
    those of the attempt that completed (the output the user keeps), ttft counts from the first send."""

    index: int
    arrival: float  # when it was due; its first attempt is sent then
    sent: bool = False  # False: the load stopped before it was due
    first_token: float | None = None
    done: float | None = None
    tokens: int = 0
    failed_attempts: int = 0
    attempt_sent: float | None = None  # when the attempt that completed was sent
    wasted_tokens: int = 0  # streamed by attempts that then failed
    token_times: list[float] = field(default_factory=list)

    @property
    def lost(self) -> bool:
        """Accepted (due while the load ran) but never completed."""
        return self.done is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.done is None or self.first_token is None or self.tokens < 2:
            return None
        return (self.done - self.first_token) / (self.tokens - 1)


class OpenLoad:
    """Requests sent at `offsets` seconds from `start()` (see `arrival_times`), whatever the server does: each on its
    own thread, streamed to the end and re-sent `retry_s` after a failed attempt (a refused connection, a cut
    stream, no byte for `read_timeout_s`) until it completes or the load is finished. `url` may be a callable, for
    a server that a supervisor relaunches elsewhere."""

    def __init__(self, url: str | Callable[[], str], prompts: list[str], max_new_tokens: int, offsets: list[float],
                 read_timeout_s: float = 20.0, retry_s: float = 0.5):
        self.url_of = url if callable(url) else (lambda: url)
        self.prompts, self.max_new_tokens, self.offsets = prompts, max_new_tokens, list(offsets)
        self.read_timeout_s, self.retry_s = read_timeout_s, retry_s
        self.t0 = 0.0
        self.records: list[RequestRecord] = []
        self.lock = threading.Lock()
        self.no_more = threading.Event()  # no new request is sent
        self.abandon = threading.Event()  # in-flight requests give up; what completes after is not counted
        self.threads: list[threading.Thread] = []
        self.dispatcher: threading.Thread | None = None

    def start(self) -> "OpenLoad":
        self.t0 = time.monotonic()
        self.records = [RequestRecord(i, self.t0 + off) for i, off in enumerate(self.offsets)]
        self.dispatcher = threading.Thread(target=self._dispatch, daemon=True)
        self.dispatcher.start()
        return self

    def _dispatch(self) -> None:
        for record in self.records:
            while (left := record.arrival - time.monotonic()) > 0 and not self.no_more.is_set():
                self.no_more.wait(min(left, 0.5))
            if self.no_more.is_set():
                return
            record.sent = True
            thread = threading.Thread(target=self._request, args=(record,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _request(self, record: RequestRecord) -> None:
        body = {"text": self.prompts[record.index % len(self.prompts)], "stream": True,
                "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": self.max_new_tokens}}
        while not self.abandon.is_set():
            sent, times = time.monotonic(), []
            try:
                stream_generate(self.url_of(), body, lambda n, now: times.extend([now] * n),
                                timeout=(2, self.read_timeout_s))
                if len(times) < self.max_new_tokens:
                    raise RuntimeError("stream ended early")
            except (requests.RequestException, RuntimeError, ValueError):
                with self.lock:
                    record.failed_attempts += 1
                    record.wasted_tokens += len(times)
                self.abandon.wait(self.retry_s)
                continue
            with self.lock:
                if not self.abandon.is_set():
                    record.attempt_sent, record.first_token, record.done = sent, times[0], times[-1]
                    record.tokens, record.token_times = len(times), times
            return

    def finish(self, drain_s: float) -> list[RequestRecord]:
        """Send nothing more; wait up to `drain_s` for the requests in flight, then give up on the rest (lost).
        Returns a snapshot of the records."""
        self.no_more.set()
        if self.dispatcher is not None:
            self.dispatcher.join()
        deadline = time.monotonic() + drain_s
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            self.abandon.set()
            return copy.deepcopy(self.records)


def rate_series(tokens: list[float], start: float, end: float, window: float = 1.0,
                step: float = 0.25) -> list[tuple[float, float]]:
    """(time since `start`, tokens/s over the preceding `window`) every `step` seconds."""
    out, t = [], start + window
    ordered = sorted(tokens)
    while t <= end:
        count = bisect.bisect_right(ordered, t) - bisect.bisect_right(ordered, t - window)
        out.append((round(t - start, 2), count / window))
        t += step
    return out


def scheduler_pid(server_pid: int, rank: int) -> int:
    """The pid of SGLang's scheduler process for TP rank `rank` under a launched server (by its process title)."""
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if f"scheduler_TP{rank}" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise RuntimeError(f"no scheduler process for TP rank {rank}")
