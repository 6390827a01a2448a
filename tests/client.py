"""Small HTTP helpers and checks the server tests share."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import requests

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def generate(url: str, prompt: str, max_new_tokens: int, api_key: str | None = None, **extra) -> dict:
    body = {"text": prompt, "sampling_params": {**GREEDY, "max_new_tokens": max_new_tokens}, **extra}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.post(f"{url}/generate", json=body, headers=headers, timeout=300)
    response.raise_for_status()
    return response.json()


def generate_concurrently(url: str, prompts: list[str], max_new_tokens: int | list[int],
                          api_key: str | None = None) -> list[dict]:
    """All prompts in flight at once, so the server batches them together (one length for all, or one each)."""
    lengths = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda p, n: generate(url, p, n, api_key), prompts, lengths))


def run_with_fault(url: str, fault, prompts: list[str], max_new_tokens: int, after_tokens: int = 8,
                   api_key: str | None = None, **extra) -> list[dict]:
    """Send every prompt at once and call `fault()` once the first (streamed) one has decoded `after_tokens`
    tokens, so the fault lands mid-decode however fast the machine is; return every final response. `extra`
    goes into every request's body (`routed_dp_rank`: all on one replica, so the streamed one that times the
    fault decodes beside the others)."""
    results: list = [None] * len(prompts)
    decoding = threading.Event()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def streamed():
        body = {"text": prompts[0], "sampling_params": {**GREEDY, "max_new_tokens": max_new_tokens}, "stream": True,
                **extra}
        with requests.post(f"{url}/generate", json=body, headers=headers, stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    results[0] = json.loads(line[5:])
                    if len(results[0].get("output_ids", [])) >= after_tokens:
                        decoding.set()
        decoding.set()

    def one(i):
        results[i] = generate(url, prompts[i], max_new_tokens, api_key, **extra)

    threads = [threading.Thread(target=streamed)] + [threading.Thread(target=one, args=(i,))
                                                     for i in range(1, len(prompts))]
    for thread in threads:
        thread.start()
    assert decoding.wait(timeout=300), "the requests never started decoding"
    fault()
    for thread in threads:
        thread.join(timeout=600)
    assert all(r is not None for r in results), "a request never completed"
    assert "error" not in results[0] and len(results[0]["output_ids"]) == max_new_tokens
    return results


READ_LINE = re.compile(r"(?:TP(\d+)\] )?sglang-ft: read (\d+) of (\d+) checkpoint bytes")  # no TP tag at TP 1


def assert_kv_came_from_the_store(recovery: dict, requests_in_flight: int) -> None:
    """The lost heads' KV of a SIGKILLed worker came back from the backup store. The kill may land between a step's
    end and that step's copy to the store: then that step's row of each request in flight is lost with the worker and
    its token is computed again, at most one per request (the design's bound; test_failover's kill_uncopied pins that
    instant and sees it happen). Anything more would be a re-prefill."""
    assert recovery["kv_blocks_restored"] > 0, recovery
    assert recovery["kv_tokens_recomputed"] <= requests_in_flight, recovery


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


def start_together(servers) -> None:
    """Start several ServerProcesses at once: a launch is mostly single-process imports (the launcher's, then each
    scheduler's), so two overlap on this machine's cores instead of queueing. If one fails, all are stopped."""
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [pool.submit(server.start) for server in servers]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for server in servers:
            server.stop()
        raise


def _first_mapping(pid: int, library: str) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return next(line.split("-")[0] for line in maps if line.rstrip().endswith(library))


def worker_start_methods(server, library: str = "libtorch_cpu.so") -> list[str]:
    """How each worker of a live --ft server was started by its launcher, told apart by address: a fork keeps the
    launcher's address space, so `library` sits at the launcher's address; a spawned child exec'd Python afresh,
    and address-space randomisation put it elsewhere. (SGLang retitles its processes, so command lines cannot tell.)"""
    import psutil
    import requests

    with open("/proc/sys/kernel/randomize_va_space") as aslr:
        assert aslr.read().strip() != "0", "without address-space randomisation a spawned worker looks forked"
    launcher = server.proc.pid
    launcher_address = _first_mapping(launcher, library)
    methods = []
    for worker in requests.get(f"{server.url}/ft/status", timeout=30).json()["workers"]:
        assert psutil.Process(worker["pid"]).parent().pid == launcher, worker
        methods.append("fork" if _first_mapping(worker["pid"], library) == launcher_address else "spawn")
    return methods


class LongStream(threading.Thread):
    """One streamed greedy request, long enough to outlast whatever the test does meanwhile (regroups, a restart),
    read until `hang_up` is set and then abandoned (the server aborts it); its output so far in `output_ids`."""

    def __init__(self, url: str, prompt: str, max_new_tokens: int = 1500):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_new_tokens = url, prompt, max_new_tokens
        self.output_ids: list[int] = []
        self.error = None
        self.hang_up = threading.Event()

    def run(self) -> None:
        body = {"text": self.prompt, "stream": True,
                "sampling_params": {**GREEDY, "max_new_tokens": self.max_new_tokens}}
        try:
            with requests.post(f"{self.url}/generate", json=body, stream=True, timeout=600) as response:
                for line in response.iter_lines():
                    if line.startswith(b"data:") and line != b"data: [DONE]":
                        chunk = json.loads(line[5:])
                        if "error" in chunk:
                            self.error = chunk
                            return
                        self.output_ids = chunk["output_ids"]
                    if self.hang_up.is_set():
                        return
        except requests.RequestException as exc:
            self.error = repr(exc)
