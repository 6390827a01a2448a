"""Small HTTP helpers the server tests share."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import requests

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def generate(url: str, prompt: str, max_new_tokens: int, api_key: str | None = None, **extra) -> dict:
    body = {"text": prompt, "sampling_params": {**GREEDY, "max_new_tokens": max_new_tokens}, **extra}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.post(f"{url}/generate", json=body, headers=headers, timeout=300)
    response.raise_for_status()
    return response.json()


def generate_concurrently(url: str, prompts: list[str], max_new_tokens: int, api_key: str | None = None) -> list[dict]:
    """All prompts in flight at once, so the server batches them together."""
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda p: generate(url, p, max_new_tokens, api_key), prompts))


READ_LINE = re.compile(r"(?:TP(\d+)\] )?sglang-ft: read (\d+) of (\d+) checkpoint bytes")  # no TP tag at TP 1


def assert_ranks_read_only_their_slices(log_text: str, tp: int) -> None:
    """Norms are replicated, everything else is split: each rank reads about 1/tp of the checkpoint bytes."""
    reads = {int(r or 0): (int(got), int(total)) for r, got, total in READ_LINE.findall(log_text)}
    assert sorted(reads) == list(range(tp))
    for got, total in reads.values():
        assert got <= total / tp * 1.1 + 4096 and (tp > 1 or got == total)


def still_running(processes, timeout_s: float) -> list:
    """Of `processes` (psutil), those still running after up to `timeout_s`: a zombie (exited, not yet reaped by
    whoever adopted it) counts as gone."""
    import time

    import psutil

    def running(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition", poll_s: float = 0.1):
    """`predicate()`'s first truthy value within `timeout_s`, polled every `poll_s`; fails the test otherwise."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
