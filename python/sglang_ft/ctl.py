"""`python -m sglang_ft.ctl`: operate a running `--ft` server from a shell through its `/ft/*` HTTP API.

Subcommands: `status` (tables of workers and recoveries, or `--json`), `watch` (status, refreshed), `events` (the
fault event stream, `ctl_events.py`), `inject`
(a fault at a TP rank), `drain` and `rejoin` (a worker out of or back into the group; `--wait` follows it to the end).
Exit codes: 0 done, 1 the server refused or a wait ran out, 2 the server is not reachable or the command line is bad.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import requests
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from tqdm import tqdm

from ft.faults import FAULT_HELP, FAULT_KINDS
from sglang_ft.ctl_errors import EXIT_REFUSED, EXIT_UNREACHABLE, CtlError, server_message

DEFAULT_URL = "http://127.0.0.1:30000"
WORKER_OPS = {  # subcommand: (what it does, when --wait is done)
    "drain": ("take a healthy worker out of the group, for maintenance",
              "it is out of the group and the others' regroup is over"),
    "rejoin": ("restart a dead worker and plan it back into the group", "it is a healthy member again"),
}
STATE_STYLES = {"healthy": "green", "suspect": "yellow", "dead": "red", "joining": "cyan"}


class FtClient:
    """The `/ft/*` calls, with the server's own error message surfaced (it says which flag or worker is wrong)."""

    def __init__(self, url: str, api_key: str | None, timeout: float, admin_api_key: str | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.admin_api_key = admin_api_key or api_key  # inject, drain, rejoin: SGLang's admin level
        self.timeout = timeout

    def status(self) -> dict:
        return self._call("GET", "/ft/status", key=self.api_key)

    def post(self, path: str, body: dict) -> dict:
        """An admin operation (every POST under /ft/): the server's --admin-api-key where it has one."""
        return self._call("POST", path, body, key=self.admin_api_key)

    def _call(self, method: str, path: str, body: dict | None = None, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = requests.request(method, self.url + path, json=body, headers=headers, timeout=self.timeout)
        except requests.ConnectionError:
            raise CtlError(f"the server is not reachable at {self.url}: is it running, and is --url right?",
                           EXIT_UNREACHABLE) from None
        except requests.Timeout:
            raise CtlError(f"{method} {path}: no answer from {self.url} within {self.timeout:g} s (--timeout)")
        if not response.ok:
            hint = "" if response.status_code != 401 else " (check --api-key or $SGLANG_API_KEY)" if method == "GET" \
                else " (check --admin-api-key or $SGLANG_ADMIN_API_KEY where the server has one, else --api-key)"
            raise CtlError(f"{method} {path}: HTTP {response.status_code}: {server_message(response)}{hint}")
        return response.json()


# --- rendering ---

def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _table(title: str, columns: tuple[str, ...], text_columns: tuple[str, ...]) -> Table:
    """Headers are the JSON keys, split at their last "_" onto two lines so nine columns fit a terminal."""
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in columns:
        table.add_column("\n".join(column.rsplit("_", 1)), justify="left" if column in text_columns else "right")
    return table


def _weight_cache(cache: dict | None) -> str:
    """The node's copy of the checkpoint in host memory: its state, and its size while it holds any."""
    if not cache:
        return "?"
    return f"{cache.get('state', '?')} {_size(cache['bytes'])}" if cache.get("bytes") else cache.get("state", "?")


def _heads(worker: dict) -> str:
    """KV heads by TP, plus the remainder heads it runs for the requests it owns under hybrid attention ("1+1")."""
    remainder = worker.get("remainder_kv_heads")
    return f"{worker.get('kv_heads')}+{remainder}" if remainder else _cell(worker.get("kv_heads"))


def render_status(status: dict) -> Group:
    """Workers, one summary line, recoveries: what an operator checks first after a fault (per replica, and the
    routing between them, under --dp-size)."""
    if "replicas" in status:
        routing = status.get("routing", {})
        parts = [Text.assemble(("routing ", "bold"), str(routing.get("policy")), ("  live ", "bold"),
                               _cell(routing.get("live_replicas")), ("  lost ", "bold"), _cell(routing.get("lost")),
                               ("  moved_requests ", "bold"), str(routing.get("moved_requests", 0)),
                               ("  kv_taken_over ", "bold"), str(routing.get("moved_tokens_kv_taken_over", 0)),
                               ("  recomputed ", "bold"), str(routing.get("moved_tokens_recomputed", 0)))]
        for k, replica in enumerate(status["replicas"]):
            serving = "serving" if replica.get("serving", True) else "lost"
            parts += [Text(f"replica {k} ({serving})", style="bold underline"), render_status(replica)]
        return Group(*parts)
    workers = _table("workers", ("worker", "rank", "pid", "state", "kv_heads", "kv_bytes_used", "outstanding_tokens",
                                 "last_step_ms", "kv_backup_dropped", "kv_backup_bytes"), ("state",))
    for w in status.get("workers", []):
        state = w.get("state", "?")
        workers.add_row(_cell(w.get("worker")), _cell(w.get("rank")), _cell(w.get("pid")),
                        Text(state, style=STATE_STYLES.get(state, "")), _heads(w),
                        _size(w.get("kv_bytes_used")), _cell(w.get("outstanding_tokens")),
                        _cell(w.get("last_step_ms")), _cell(w.get("kv_backup_dropped")),
                        _size(w.get("kv_backup_bytes")))
    regrouping = status.get("regrouping")
    summary = Text.assemble(
        ("epoch ", "bold"), str(status.get("epoch")), ("  tp_size ", "bold"), str(status.get("tp_size")),
        ("  regrouping ", "bold"), "no" if regrouping is None else f"to epoch {regrouping}",
        ("  kv_backup ", "bold"), str(status.get("kv_backup", {}).get("state", "?")),
        ("  kv_blocks_restored ", "bold"), str(status.get("kv_blocks_restored", 0)),
        ("  kv_tokens_recomputed ", "bold"), str(status.get("kv_tokens_recomputed", 0)),
        ("  weight_cache ", "bold"), _weight_cache(status.get("weight_cache")))
    columns = ("epoch", "cause", "detect_ms", "recover_ms", "bytes_p2p", "bytes_from_host_cache", "bytes_reloaded",
               "kv_blocks_restored", "kv_tokens_recomputed", "joined")
    recoveries = _table("recoveries", columns, ("cause", "joined"))
    for r in status.get("recoveries", []):
        recoveries.add_row(*(_size(r.get(c)) if c.startswith("bytes_") else _cell(r.get(c)) for c in columns))
    if not status.get("recoveries"):
        recoveries.caption = "none yet"
    return Group(workers, summary, recoveries)


# --- subcommands ---

def cmd_status(client: FtClient, args, console: Console) -> int:
    status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))  # plain, for jq and scripts
    else:
        console.print(render_status(status))
    return 0


def cmd_watch(client: FtClient, args, console: Console) -> int:
    """Keep polling through errors: during a regroup or a restart the server may be briefly slow or away."""
    refreshes = 0
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                try:
                    view = render_status(client.status())
                except CtlError as error:
                    view = Text(f"error: {error}", style="red")
                refreshes += 1
                live.update(Group(view, Text(time.strftime("%H:%M:%S") + f"  every {args.interval:g} s, Ctrl-C "
                                             "to stop", style="dim")), refresh=True)
                if args.count is not None and refreshes >= args.count:
                    return 0
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_inject(client: FtClient, args, console: Console) -> int:
    reply = client.post("/ft/inject_fault", {"rank": args.rank, "kind": args.kind, "dp_rank": args.dp_rank})
    console.print(f"injected {reply.get('injected', args.kind)} into rank {args.rank} "
                  f"(worker {_cell(reply.get('worker'))}, pid {_cell(reply.get('pid'))})")
    return 0


def cmd_events(client: FtClient, args, console: Console) -> int:
    from sglang_ft.ctl_events import follow

    return follow(client.url, client.api_key, args.last_event_id, args.count, client.timeout)


def _find_worker(status: dict, worker: int) -> dict:
    return next((w for w in status.get("workers", []) if w.get("worker") == worker), {})


def _rejoined(status: dict, worker: int) -> bool:
    entry = _find_worker(status, worker)
    return entry.get("rank") is not None and entry.get("state") == "healthy"


def _drained(status: dict, worker: int) -> bool:
    """Out of the group, and the others' regroup without it is over (they serve at the new width)."""
    return _find_worker(status, worker).get("rank") is None and status.get("regrouping") is None


def cmd_worker_op(client: FtClient, args, console: Console) -> int:
    """POST /ft/drain or /ft/rejoin; with --wait, poll /ft/status until the group has changed, or time out."""
    client.post(f"/ft/{args.command}", {"worker": args.worker, "dp_rank": args.dp_rank})
    done, verb = (_rejoined, "rejoined") if args.command == "rejoin" else (_drained, "drained")
    if not args.wait:
        console.print(f"{args.command} of worker {args.worker} requested")
        return 0
    deadline = time.monotonic() + args.wait_timeout
    with tqdm(desc=f"worker {args.worker}: waiting to be {verb}", bar_format="{desc} ({elapsed}){postfix}",
              file=sys.stderr, disable=None) as bar:
        while True:
            status = client.status()
            status = status["replicas"][args.dp_rank] if "replicas" in status else status
            entry = _find_worker(status, args.worker)
            bar.set_postfix_str(f"state {entry.get('state', '?')}, rank {_cell(entry.get('rank'))}, "
                                f"epoch {status.get('epoch')}")
            if done(status, args.worker):
                break
            if time.monotonic() >= deadline:
                raise CtlError(f"worker {args.worker} was not {verb} within {args.wait_timeout:g} s "
                               f"(--wait-timeout); it is {entry.get('state', 'unknown')}, "
                               f"rank {_cell(entry.get('rank'))}")
            time.sleep(args.interval)
    console.print(f"worker {args.worker} {verb}: epoch {status.get('epoch')}, tp_size {status.get('tp_size')}")
    return 0


# --- command line ---

def _connection_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """On the main parser with defaults, and on each subcommand with none, so they go before or after it."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=default(DEFAULT_URL), help=f"the server (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=default(os.environ.get("SGLANG_API_KEY")),
                        help="the server's --api-key (default: $SGLANG_API_KEY)")
    parser.add_argument("--admin-api-key", default=default(os.environ.get("SGLANG_ADMIN_API_KEY")),
                        help="the server's --admin-api-key, for inject, drain and rejoin where it has one (default: "
                             "$SGLANG_ADMIN_API_KEY, else --api-key)")
    parser.add_argument("--timeout", type=float, default=default(10.0), help="seconds per HTTP call (default 10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sglang_ft.ctl", description="Operate a running --ft server through its /ft/* HTTP API.")
    _connection_flags(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    status = sub.add_parser("status", parents=[common], help="workers and recoveries (GET /ft/status)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(run=cmd_status)

    watch = sub.add_parser("watch", parents=[common], help="status, refreshed until Ctrl-C")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    watch.add_argument("--count", type=int, help="stop after this many refreshes")
    watch.set_defaults(run=cmd_watch)

    inject = sub.add_parser("inject", parents=[common], help="fault the worker at a TP rank (POST /ft/inject_fault)")
    inject.add_argument("--rank", type=int, required=True, help="current TP rank of the worker")
    inject.add_argument("--kind", required=True, choices=FAULT_KINDS, help=FAULT_HELP)
    inject.add_argument("--dp-rank", type=int, default=0, help="its data-parallel replica (with --dp-size)")
    inject.set_defaults(run=cmd_inject)

    events = sub.add_parser("events", parents=[common], help="follow the fault events (GET /ft/events), one JSON "
                            "line each, reconnecting with Last-Event-ID")
    events.add_argument("--last-event-id", type=int, help="replay the events after this id first")
    events.add_argument("--count", type=int, help="stop after this many events")
    events.set_defaults(run=cmd_events)

    for name, (what, done) in WORKER_OPS.items():
        op = sub.add_parser(name, parents=[common], help=f"{what} (POST /ft/{name})", description=f"{what[0].upper()}{what[1:]}.")
        op.add_argument("--worker", type=int, required=True, help="the worker (its launch TP rank)")
        op.add_argument("--dp-rank", type=int, default=0, help="its data-parallel replica (with --dp-size)")
        op.add_argument("--wait", action="store_true", help=f"poll /ft/status until {done}")
        op.add_argument("--wait-timeout", type=float, default=300.0,
                        help="give up waiting after this many seconds (default 300)")
        op.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
        op.set_defaults(run=cmd_worker_op)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = FtClient(args.url, args.api_key, args.timeout, args.admin_api_key)
    try:
        return args.run(client, args, Console())
    except CtlError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:  # a --wait stopped by hand; the request itself was made
        return 130


if __name__ == "__main__":
    sys.exit(main())
