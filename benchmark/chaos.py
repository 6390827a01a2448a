"""Chaos soak: a steady greedy load on a `--ft` server while its workers are killed, hung, stalled and brought
back and its KV backup store is killed; every request must come back whole and equal to transformers.

    python benchmark/chaos.py [--full] [--tp 4] [--seed 0] [--rejoin auto|asked] [--rounds N] [--duration-s S]
        [--interval-s S] [--clients 3] [--out DIR]

Faults come from one thread, one at a time, about `--interval-s` apart (uniform 0.5-1.5x, seeded), in rounds: a
round is the kinds below in a seeded random order, and a kind that cannot apply yet (a kill or hang that would
leave fewer than `--min-live` workers serving, a rejoin with no worker dead) waits for a later turn. Dead workers
come back by the server's own restarts (`--rejoin auto`, the default: `--ft-respawn`, 1 s after a death) or when
the monkey asks (`--rejoin asked`: a sixth kind, `POST /ft/rejoin`); after the last fault the load goes on until
they are all back.

- kill: SIGKILL a serving worker (rank 0 included), as a GPU that dies takes its process.
- hang: SIGSTOP a serving worker until the controller declares it dead (a peer blocked on it confirms the hang, or
  the heartbeat timeout), then SIGCONT: it must find itself fenced and exit.
- stall: SIGSTOP a serving worker for a quarter of the heartbeat timeout, then SIGCONT: a hiccup, not a failure;
  it must stay in the group.
- store: SIGKILL the KV backup store; its keeper must respawn it.
- torn: a serving worker takes its next step as failed while the others finish it (`fail_step`: what a rank dying
  inside the last all-gather leaves); the group must regroup with every worker in it.
- rejoin (`--rejoin asked` only): `POST /ft/rejoin` for a dead worker.

Pass (the exit code is 1 otherwise):
- every request completed with transformers' greedy output, none had to be re-sent (the server dropped no
  accepted request), none is unfinished (0 lost), none took longer than `--hung-after-s` (0 hung);
- every fault was survived as above, every restarted worker is back in the group by the end, each rejoin moved
  no bytes from disk and recomputed no KV, and the server answers `/health` at the end;
- with no request left, the KV pool uses as many tokens as before the load (no slot leaked);
- every worker and store process that was replaced is gone, and after SIGTERM nothing outlives the launcher.
Reported: requests served, faults survived by kind, the longest stall of the token stream, the recoveries.
Writes `chaos.json` to `--out` (default benchmark/results) and prints a summary table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ft.process_watch import ProcessWatch
from ft.remainder_routing import POLICIES
from sglang_ft.server_args import FtArgs
from sglang_ft.tools import make_tiny_model
from sglang_ft.tools.hf_reference import greedy_references
from sglang_ft.tools.load import Load, longest_gap, server_load
from sglang_ft.tools.server_process import ServerProcess

KINDS = ("kill", "hang", "stall", "store", "torn", "rejoin")
AUTO_KINDS = KINDS[:-1]  # with the server's own restarts nothing needs asking
PROMPTS = [
    "The model server",
    "Heartbeat epoch recover restart reload weights",
    "Tell me a story about a quiet river",
    "rank tensor parallel group heads cache prefix radix failure",
    "one two three",
    "Seven blue mountains and a bright city",
]
# short: one round of the kinds (the form `make test` runs); full: a 10-minute soak
PRESETS = {
    "short": dict(rounds=1, duration_s=90.0, interval_s=6.0),
    "full": dict(rounds=1000, duration_s=600.0, interval_s=10.0),
}


gone = ProcessWatch().gone  # a process that exited, zombie or reaped (the controller's own check)


@dataclass
class Monkey:
    """Injects the faults (see the module docstring) and checks that each was survived. Every action is recorded
    as {t_s, kind, worker, pid, outcome, ok, took_s}; `ok` False is a failure of the server, not of the monkey."""

    url: str
    rng: random.Random
    heartbeat_timeout_s: float
    min_live: int = 1
    settle_s: float = 60.0  # how long a fault may take to be detected and handled
    headers: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    replaced: set[int] = field(default_factory=set)  # pids of killed or fenced workers and killed stores
    rejoining: dict[int, float] = field(default_factory=dict)  # worker -> when its rejoin was asked
    joined: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    stopped: set[int] = field(default_factory=set)  # pids this monkey SIGSTOPped and has not resumed yet

    def status(self) -> dict:
        return requests.get(f"{self.url}/ft/status", headers=self.headers, timeout=10).json()

    @staticmethod
    def serving(st: dict) -> list[dict]:
        return [w for w in st["workers"] if w["rank"] is not None and w["state"] in ("healthy", "suspect")]

    def dead(self, st: dict) -> list[dict]:
        return [w for w in st["workers"] if w["rank"] is None and w["state"] == "dead"
                and w["worker"] not in self.rejoining]

    def applicable(self, kind: str, st: dict) -> bool:
        if st.get("regrouping") is not None:
            return kind == "stall"  # a stall is a hiccup: it may come at any time
        if kind in ("kill", "hang"):
            return len(self.serving(st)) > self.min_live
        if kind == "stall":
            return bool(self.serving(st))
        if kind == "torn":
            return len(self.serving(st)) >= 2
        if kind == "store":
            return st["kv_backup"].get("pid") is not None
        return bool(self.dead(st))

    def run(self, kinds_per_round: tuple[str, ...], rounds: int, until: float, interval_s: float) -> None:
        """Inject rounds of faults until `rounds` are done, `until` (time.monotonic) passes or `stop` is set."""
        try:
            for _ in range(rounds):
                kinds = list(kinds_per_round)
                self.rng.shuffle(kinds)
                while kinds:
                    if self.stop.wait(interval_s * self.rng.uniform(0.5, 1.5)) or time.monotonic() >= until:
                        return
                    st = self.watch_joins()
                    kind = next((k for k in kinds if self.applicable(k, st)), None)
                    if kind is not None:
                        kinds.remove(kind)
                        self.act(kind, st)
        finally:
            for pid in list(self.stopped):  # never leave a process stopped behind
                self._signal(pid, signal.SIGCONT)

    def act(self, kind: str, st: dict) -> None:
        started = time.monotonic()
        worker = pid = None
        try:
            if kind == "store":
                pid = st["kv_backup"]["pid"]
                ok, outcome = self.kill_store(pid, st["kv_backup"]["restarts"])
            elif kind == "rejoin":
                worker = self.rng.choice(self.dead(st))["worker"]
                ok, outcome = self.rejoin(worker)
            else:
                victim = self.rng.choice(self.serving(st))
                worker, pid = victim["worker"], victim["pid"]
                ok, outcome = getattr(self, kind)(worker, pid, st["epoch"])
        except (requests.RequestException, ValueError, KeyError, OSError) as exc:
            ok, outcome = False, f"error: {exc!r}"
        record = {"t_s": round(started - self.t0, 2), "kind": kind, "worker": worker, "pid": pid,
                  "outcome": outcome, "ok": ok, "took_s": round(time.monotonic() - started, 2)}
        self.records.append(record)
        print(f"[chaos] t={record['t_s']:6.1f}s  {kind:<6} worker {worker} pid {pid}: {outcome} "
              f"({record['took_s']} s)", flush=True)

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGSTOP:
            self.stopped.add(pid)
        elif sig == signal.SIGCONT:
            self.stopped.discard(pid)

    def _wait(self, predicate, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            st = self.status()
            if (value := predicate(st)):
                return value
            time.sleep(0.2)
        return None

    def _left_group(self, worker: int, epoch: int):
        """The status once `worker` is out of the group and the regroup without it is done."""
        return lambda st: st if (st["epoch"] > epoch and st["regrouping"] is None
                                 and all(w["rank"] is None for w in st["workers"] if w["worker"] == worker)) else None

    def kill(self, worker: int, pid: int, epoch: int) -> tuple[bool, str]:
        self._signal(pid, signal.SIGKILL)
        self.replaced.add(pid)
        st = self._wait(self._left_group(worker, epoch), self.settle_s)
        return (True, f"regrouped to TP {st['tp_size']}") if st else (False, "no regroup without it")

    def hang(self, worker: int, pid: int, epoch: int) -> tuple[bool, str]:
        self._signal(pid, signal.SIGSTOP)
        st = self._wait(self._left_group(worker, epoch), self.settle_s)
        self._signal(pid, signal.SIGCONT)
        self.replaced.add(pid)
        if st is None:
            return False, "never declared dead"
        deadline = time.monotonic() + self.settle_s
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not gone(pid):
            return False, f"declared dead (TP {st['tp_size']}) but still running after SIGCONT: not fenced"
        return True, f"declared dead, regrouped to TP {st['tp_size']}, fenced on SIGCONT"

    def stall(self, worker: int, pid: int, epoch: int) -> tuple[bool, str]:
        pause = self.heartbeat_timeout_s / 4
        self._signal(pid, signal.SIGSTOP)
        time.sleep(pause)
        self._signal(pid, signal.SIGCONT)
        time.sleep(self.heartbeat_timeout_s * 1.5)  # past the timeout the stall would have started
        kept = any(w["worker"] == worker and w["pid"] == pid and w["rank"] is not None
                   for w in self.status()["workers"])
        return (True, f"stalled {pause:.2f} s, kept") if kept else (False, f"dropped after a {pause:.2f} s stall")

    def torn(self, worker: int, pid: int, epoch: int) -> tuple[bool, str]:
        rank = next(w["rank"] for w in self.status()["workers"] if w["worker"] == worker)
        response = requests.post(f"{self.url}/ft/inject_fault", json={"rank": rank, "kind": "fail_step"},
                                 headers=self.headers, timeout=30)
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}: {response.text[:200]}"
        st = self._wait(lambda s: s if s["epoch"] > epoch and s["regrouping"] is None else None, self.settle_s)
        if st is None:
            return False, "no regroup after the torn step"
        kept = any(w["worker"] == worker and w["pid"] == pid and w["rank"] is not None for w in st["workers"])
        return (True, f"regrouped with every worker, TP {st['tp_size']}") if kept else (False, "it left the group")

    def kill_store(self, pid: int, restarts: int) -> tuple[bool, str]:
        self._signal(pid, signal.SIGKILL)
        self.replaced.add(pid)
        st = self._wait(lambda s: s if s["kv_backup"]["state"] == "healthy" and s["kv_backup"]["restarts"] > restarts
                        else None, self.settle_s)
        return (True, f"respawned as pid {st['kv_backup']['pid']}") if st else (False, "not respawned")

    def rejoin(self, worker: int) -> tuple[bool, str]:
        response = requests.post(f"{self.url}/ft/rejoin", json={"worker": worker}, headers=self.headers, timeout=30)
        if response.status_code != 200:
            return False, f"HTTP {response.status_code}: {response.text[:200]}"
        self.rejoining[worker] = time.monotonic()
        return True, "asked"

    def watch_joins(self) -> dict:
        """The status, noting every asked rejoin that completed (the worker is a member again)."""
        st = self.status()
        for w in st["workers"]:
            if w["worker"] in self.rejoining and w["rank"] is not None and w["state"] == "healthy":
                asked = self.rejoining.pop(w["worker"])
                self.joined.append({"worker": w["worker"], "after_s": round(time.monotonic() - asked, 1)})
        return st

    def missing(self, st: dict, auto: bool) -> list[int]:
        """Workers still to come back: every one not serving (auto), or the ones asked back (asked)."""
        if not auto:
            return sorted(self.rejoining)
        return [w["worker"] for w in st["workers"] if w["rank"] is None]


def soak(server: ServerProcess, args, expected: dict[str, list[int]]) -> dict:
    """The load and the monkey together, then the wait for rejoins, the drain and the checks; the report."""
    url = server.url
    baseline = server_load(url)
    earlier = requests.get(f"{url}/ft/status", timeout=10).json()  # a server that served before: not the soak's
    # staggered lengths: the clients' requests overlap, so a regroup (a rejoin above all) finds some running
    load = Load(url, PROMPTS, args.max_new_tokens, expected=expected, stagger_tokens=5).start(args.clients)
    started = time.monotonic()
    monkey = Monkey(url, random.Random(args.seed), args.heartbeat_timeout_ms / 1e3, args.min_live,
                    t0=started)
    auto = args.rejoin == "auto"
    thread = threading.Thread(target=monkey.run, daemon=True, args=(
        AUTO_KINDS if auto else KINDS, args.rounds, started + args.duration_s, args.interval_s))
    thread.start()
    thread.join(timeout=args.duration_s + 4 * monkey.settle_s)
    monkey.stop.set()
    thread.join(timeout=2 * monkey.settle_s)
    faults_done = time.monotonic()
    deadline = faults_done + args.rejoin_timeout_s
    try:
        while (missing := monkey.missing(monkey.watch_joins(), auto)) and time.monotonic() < deadline:
            time.sleep(1.0)  # the load goes on while restarted workers come back
    except requests.RequestException as exc:
        return {"unreachable": f"the server stopped answering: {exc!r}", "actions": monkey.records}
    load_ended = time.monotonic()
    load.finish(timeout_s=args.hung_after_s)
    after = wait_loads(url, baseline)
    final = monkey.status()
    healthy = requests.get(f"{url}/health", timeout=30).status_code == 200
    still_running = sorted(pid for pid in monkey.replaced if not gone(pid))
    counts = Counter(r["kind"] for r in monkey.records)
    survived = Counter(r["kind"] for r in monkey.records if r["ok"])
    return {
        "served": load.completed, "mismatched": load.mismatched, "resent": load.failed_attempts,
        "resent_why": [f"t={t - started:.1f}s {why}" for t, why in load.failures],
        "lost": load.unfinished, "hung": sum(d > args.hung_after_s for d in load.durations),
        "longest_request_s": round(max(load.durations, default=0.0), 2),
        "longest_stall_s": round(longest_gap(load.tokens, started, load_ended), 2),
        "soak_s": round(load_ended - started, 1), "faults_s": round(faults_done - started, 1),
        "faults": dict(counts), "survived": dict(survived), "actions": monkey.records,
        "rejoin": args.rejoin, "rejoins_asked_completed": monkey.joined, "not_back": missing,
        "kv_tokens_used": {"before": baseline["num_used_tokens"], "after": after["num_used_tokens"]},
        "requests_left": after["num_running_reqs"] + after["num_waiting_reqs"],
        "replaced_still_running": still_running, "healthy_at_end": healthy,
        "epoch": final["epoch"], "tp_size_at_end": final["tp_size"],
        "recoveries": [{k: r.get(k) for k in ("epoch", "cause", "detect_ms", "recover_ms", "kv_blocks_restored",
                                               "kv_tokens_recomputed", "joined", "bytes_reloaded", "bytes_p2p",
                                               "kv_bytes_p2p")}
                       for r in final["recoveries"][len(earlier["recoveries"]):]],
        "respawns": final.get("respawns", [])[len(earlier.get("respawns", [])):],
        "store_restarts": final["kv_backup"].get("restarts"), "store": final["kv_backup"].get("store"),
    }


def wait_loads(url: str, baseline: dict, timeout_s: float = 30.0) -> dict:
    """`/v1/loads` once no request is left and the pool is back to `baseline`'s tokens, or at `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = server_load(url)
        idle = now["num_running_reqs"] == 0 and now["num_waiting_reqs"] == 0
        if (idle and now["num_used_tokens"] == baseline["num_used_tokens"]) or time.monotonic() >= deadline:
            return now
        time.sleep(0.2)


def failures(report: dict) -> list[str]:
    """What broke the pass criteria (see the module docstring); empty when the soak passed."""
    if "unreachable" in report:
        return [report["unreachable"]]
    found = []
    for key, what in (("mismatched", "outputs differ from transformers"), ("resent", "attempts had to be re-sent"),
                      ("lost", "requests lost"), ("hung", "requests hung")):
        if report[key]:
            found.append(f"{report[key]} {what}")
    found += [f"{a['kind']} of worker {a['worker']} (pid {a['pid']}) not survived: {a['outcome']}"
              for a in report["actions"] if not a["ok"]]
    if report["not_back"]:
        found.append(f"workers {report['not_back']} never rejoined")
    for r in report["recoveries"]:
        # a rejoin alone must take everything from peers; one ordered for a failure that also admits a joiner may
        # read the dead worker's slices from disk
        from_disk = r.get("bytes_reloaded") and r["cause"].startswith("rejoin of")
        if r.get("joined") and (from_disk or r.get("kv_tokens_recomputed")):
            found.append(f"the rejoin of epoch {r['epoch']} read {r['bytes_reloaded']} bytes from disk and "
                         f"recomputed {r['kv_tokens_recomputed']} KV tokens")
    if report["kv_tokens_used"]["after"] != report["kv_tokens_used"]["before"] or report["requests_left"]:
        found.append(f"KV slots leaked: {report['kv_tokens_used']} tokens used, {report['requests_left']} requests "
                     "left")
    if report["replaced_still_running"]:
        found.append(f"replaced processes still running: {report['replaced_still_running']}")
    if not report["healthy_at_end"]:
        found.append("/health failed at the end")
    if report.get("stragglers"):
        found.append(f"processes outlived the launcher's shutdown: {report['stragglers']}")
    if not report["served"]:
        found.append("no request was served")
    return found


def table(report: dict) -> str:
    if "unreachable" in report:
        return f"| chaos soak | |\n|---|---|\n| verdict | FAIL: {report['unreachable']} |"
    faults = ", ".join(f"{report['survived'].get(k, 0)}/{n} {k}" for k, n in report["faults"].items())
    rows = [
        ("requests served", report["served"]),
        ("lost / re-sent / hung", f"{report['lost']} / {report['resent']} / {report['hung']}"),
        *((("why re-sent", "; ".join(report["resent_why"])),) if report.get("resent_why") else ()),
        ("outputs differing from transformers", report["mismatched"]),
        ("faults survived", faults or "none"),
        ("rejoins", ", ".join(f"worker {w} (epoch {r['epoch']})" for r in report["recoveries"]
                              for w in r.get("joined") or []) or "none"),
        ("longest stall of the token stream", f"{report['longest_stall_s']} s"),
        ("longest request", f"{report['longest_request_s']} s"),
        ("KV tokens used before / after", f"{report['kv_tokens_used']['before']} / "
                                          f"{report['kv_tokens_used']['after']}"),
        ("TP at the end (epoch)", f"{report['tp_size_at_end']} ({report['epoch']})"),
        ("verdict", "PASS" if not report["failures"] else "FAIL: " + "; ".join(report["failures"])),
    ]
    return "\n".join(["| chaos soak | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="a 10-minute soak, rounds until the time is up")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rejoin", choices=("auto", "asked"), default="auto",
                        help="dead workers come back by the server's restarts or when the monkey asks")
    parser.add_argument("--rounds", type=int, help="rounds of the fault kinds (short 1)")
    parser.add_argument("--duration-s", type=float, help="no fault starts after this (short 90, full 600)")
    parser.add_argument("--interval-s", type=float, help="mean seconds between faults (short 6, full 10)")
    parser.add_argument("--clients", type=int, default=3, help="closed-loop streaming clients")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-live", type=int, default=1, help="never fail a worker that would leave fewer serving")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=FtArgs.heartbeat_timeout_ms,
                        help="the server's --ft-heartbeat-timeout-ms (default: sglang-ft's)")
    parser.add_argument("--attention", choices=("tp", "hybrid"), default="tp", help="the server's --ft-attention")
    parser.add_argument("--kv-placement", choices=("contiguous", "cyclic"), default="contiguous",
                        help="the server's --ft-kv-placement")
    parser.add_argument("--routing", choices=POLICIES, default="prefix_load",
                        help="the server's --ft-routing (with --attention hybrid)")
    parser.add_argument("--hung-after-s", type=float, default=120.0, help="a request taking longer counts as hung")
    parser.add_argument("--rejoin-timeout-s", type=float, default=300.0,
                        help="after the last fault, wait this long for dead workers to come back")
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/sglang-ft/models/tiny-llama")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    for key, value in PRESETS["full" if args.full else "short"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tp < 2:
        parser.error("--tp must be at least 2 (workers fail)")
    if args.attention == "hybrid" and args.kv_placement == "cyclic":
        parser.error("--attention hybrid and --kv-placement cyclic both place the remainder heads: choose one")
    if not 1 <= args.min_live < args.tp:
        parser.error(f"--min-live must be in [1, {args.tp - 1}]")
    if args.rounds < 1 or args.clients < 1 or args.max_new_tokens < 1 or args.duration_s <= 0 or args.interval_s <= 0:
        parser.error("--rounds, --clients, --max-new-tokens, --duration-s and --interval-s must be positive")
    return args


def launch(args: argparse.Namespace, server_process=ServerProcess) -> ServerProcess:
    """The `--ft` server the soak runs on, healthy (the tiny model made first if `--model-dir` has none); the tests
    pass their `server_process` factory (their launcher)."""
    make_tiny_model.ensure_model(args.model_dir)
    flags = ["--ft-enable-fault-injection", "--ft-heartbeat-timeout-ms", str(args.heartbeat_timeout_ms),
             "--ft-attention", args.attention, "--ft-routing", args.routing, "--ft-kv-placement", args.kv_placement]
    flags += ["--ft-respawn", "--ft-respawn-delay-s", "1"] if args.rejoin == "auto" else []
    return server_process(str(args.model_dir), tp_size=args.tp, ft=True, extra_args=flags).start()


def run(server: ServerProcess, args: argparse.Namespace) -> dict:
    """The soak on `server` (launched by `launch(args)`, at full width; it may have served before: only the soak's
    own recoveries and restarts are reported), which is stopped after; the report, also written to `--out`."""
    print(f"[chaos] TP {args.tp} --ft server healthy in {server.startup_s:.1f} s; {args.clients} clients, up to "
          f"{args.rounds} round(s) of {', '.join(AUTO_KINDS if args.rejoin == 'auto' else KINDS)}, "
          f"~{args.interval_s:g} s apart, rejoins {args.rejoin}, for at most "
          f"{args.duration_s:g} s (seed {args.seed})", flush=True)
    try:
        expected = greedy_references(str(args.model_dir), PROMPTS, args.max_new_tokens)
        report = soak(server, args, expected)
    finally:
        server.stop()
    report["stragglers"] = server.stragglers
    report["failures"] = failures(report)
    report.update(date=dt.date.today().isoformat(), form="full" if args.full else "short",
                  machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.json").write_text(json.dumps(report, indent=1))
    print(table(report), flush=True)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return run(launch(args), args)


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
