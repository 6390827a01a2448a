"""A steady closed-loop load of streaming greedy requests, shared by the demo and the benchmarks.

Each client sends a request, reads its stream to the end and sends the next; an attempt that fails (connection
refused, stream cut, an error chunk) is re-sent, as a real client would, and counted. The load records when
every token arrived, so throughput over time, the pause a failure causes and how fast it comes back can be read
off afterwards; with `expected` it also checks every completed output against a reference.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from dataclasses import dataclass, field

import psutil
import requests


@dataclass
class Load:
    url: str
    prompts: list[str]
    max_new_tokens: int
    expected: dict[str, list[int]] | None = None  # prompt -> reference greedy token ids
    tokens: list[float] = field(default_factory=list)  # arrival time of every streamed token
    completed: int = 0
    mismatched: int = 0
    failed_attempts: int = 0
    unfinished: int = 0  # accepted by a client but not completed when the load stopped
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int) -> "Load":
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()
        return self

    def finish(self, timeout_s: float = 180.0) -> None:
        """Stop sending new requests; the ones in flight are read to their end (or counted unfinished)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=timeout_s)

    def client(self, index: int) -> None:
        n = index
        while not self.stop.is_set():
            if self._one(self.prompts[n % len(self.prompts)]):
                n += 1

    def _one(self, prompt: str) -> bool:
        """One request until it completes; a failed attempt is retried (re-sent) until the load stops."""
        body = {"text": prompt, "stream": True,
                "sampling_params": {"temperature": 0, "ignore_eos": True, "max_new_tokens": self.max_new_tokens}}
        while True:
            try:
                output_ids = self._stream(body)
                with self.lock:
                    self.completed += 1
                    if self.expected is not None and output_ids != self.expected[prompt]:
                        self.mismatched += 1
                return True
            except (requests.RequestException, RuntimeError, ValueError):
                with self.lock:
                    self.failed_attempts += 1
                if self.stop.is_set():
                    with self.lock:
                        self.unfinished += 1
                    return False
                time.sleep(0.2)

    def _stream(self, body: dict) -> list[int]:
        seen, output_ids = 0, []
        with requests.post(f"{self.url}/generate", json=body, stream=True, timeout=(2, 120)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                output_ids = chunk.get("output_ids", [])
                now = time.monotonic()
                with self.lock:
                    self.tokens.extend([now] * max(0, len(output_ids) - seen))
                seen = max(seen, len(output_ids))
        if seen < self.max_new_tokens:
            raise RuntimeError("stream ended early")
        return output_ids

    def tokens_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(start <= t < end for t in self.tokens)


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
