"""`python -m sglang_ft.ctl` against an in-process fake of the `/ft/*` API (no SGLang server): the status tables and
JSON, the bodies and key each subcommand sends, `--wait`, and the messages and exit codes of every failure."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest
from tests.fake_http import serving
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ft.controller_state import ControllerState
from ft.failure_detector import FailureDetector
from ft.membership import Membership, WorkerState
from ft.messages import Heartbeat, WorkerLoad
from sglang_ft import ctl
from sglang_ft.entrypoints.ft_runtime import InjectFaultRequest, WorkerRequest

KEY = "sk-ctl-test"


class _Store:
    """Stands in for the backup store's keeper: only its status."""

    def status(self) -> dict:
        return {"state": "healthy", "pid": 4242, "restarts": 0, "respawn": False, "events": [], "store": None}


def _recovery(epoch: int, cause: str, joined: list[int], blocks: int = 0) -> dict:
    """A recovery entry as the controller records it when a regroup completes."""
    return {"epoch": epoch, "cause": cause, "detect_ms": 2012.4, "recover_ms": 845.2, "bytes_p2p": 3 << 20,
            "bytes_from_host_cache": 2 << 20, "bytes_reloaded": 0, "bytes_kept": 9 << 20, "kv_blocks_restored": blocks, "kv_bytes_p2p": 0,
            "kv_tokens_recomputed": 0, "stage_ms": {"plan": 0.4}, "workers": [0, 1, 3], "joined": joined}


class FakeFtServer:
    """The `/ft/*` routes over a real `ControllerState` (so `/ft/status` has the controller's own shape) and the real
    request bodies' models; each drain or rejoin plays a short script, one step per status poll, instead of a
    controller. Every request is recorded."""

    def __init__(self, fault_injection: bool = True):
        membership = Membership.initial(4)
        for worker, record in membership.workers.items():
            record.pid, record.state, record.last_beat = 1000 + worker, WorkerState.HEALTHY, time.monotonic()
        self.state = ControllerState(membership, FailureDetector(membership, 0.2, 2.0))
        self.state.kv_senders = {w: Heartbeat(w, 1000 + w, 0, 0, (100 + w, w, (w + 1) << 20)) for w in range(4)}
        # 8 KV heads over the 3 left: 3 + 3 + 2, so the same 100 tokens cost worker 3 a third less KV
        self.state.loads = {w: WorkerLoad(q_heads=2 * h, kv_heads=h, kv_tokens_used=100, kv_tokens_free=900,
                                          kv_bytes_per_token=h << 10, running_requests=2, waiting_requests=1,
                                          outstanding_tokens=40, last_step_ms=12.5)
                            for w, h in ((0, 3), (1, 3), (2, 3), (3, 2))}
        self.state.kv_backup = _Store()
        # Worker 2 was killed and the others regrouped without it; worker 3 is late with its beats.
        membership.set_state(2, WorkerState.DEAD, time.monotonic())
        membership.set_state(3, WorkerState.SUSPECT)
        membership.regroup((0, 1, 3))
        self.state.recoveries.append(_recovery(1, "worker 2: no heartbeat for 2000 ms", [], blocks=12))
        self.fault_injection = fault_injection
        self.requests: list[tuple[str, str, dict | None, str | None]] = []
        self.script: list = []
        self.stuck = False  # a rejoin that never completes (its restarts keep failing)
        self.admin_key = None  # SGLang's --admin-api-key: where set, the POSTs (admin operations) need it instead
        self.url = ""
        self.app = self._app()

    def _status(self) -> dict:
        if self.script:
            self.script.pop(0)()
        return self.state.status(time.monotonic())

    def _regroup(self, workers: tuple[int, ...]) -> None:
        self.state.regrouping = self.state.membership.regroup(workers)

    def _regroup_done(self, cause: str, joined: list[int]) -> None:
        for worker in joined:
            self.state.membership.set_state(worker, WorkerState.HEALTHY)
        self.state.recoveries.append(_recovery(self.state.regrouping, cause, joined))
        self.state.regrouping = None

    def _app(self) -> FastAPI:
        app = FastAPI()
        membership = self.state.membership

        @app.middleware("http")
        async def record_and_check_key(request: Request, call_next):
            body = await request.body()
            auth = request.headers.get("authorization")
            self.requests.append((request.method, request.url.path, json.loads(body) if body else None, auth))
            key = self.admin_key if self.admin_key and request.method == "POST" else KEY
            if auth != f"Bearer {key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)  # as SGLang's --api-key check
            return await call_next(request)

        @app.get("/ft/status")
        async def status():
            return self._status()

        @app.post("/ft/inject_fault")
        async def inject(body: InjectFaultRequest):
            if not self.fault_injection:
                return JSONResponse({"error": "fault injection is disabled; start the server with "
                                              "--ft-enable-fault-injection"}, status_code=403)
            group = membership.members()
            if body.rank >= len(group):
                return JSONResponse({"error": f"rank must be in [0, {len(group)}), got {body.rank}"}, 400)
            worker = group[body.rank]
            return {"injected": body.kind, "rank": body.rank, "worker": worker, "pid": 1000 + worker}

        @app.post("/ft/rejoin")
        async def rejoin(body: WorkerRequest):
            if membership.workers[body.worker].state is not WorkerState.DEAD:
                return JSONResponse({"error": f"worker {body.worker} is not dead: nothing to rejoin"}, 409)
            if self.stuck:
                return {"rejoining": body.worker}
            self.script = [lambda: membership.set_state(body.worker, WorkerState.JOINING),
                           lambda: self._regroup((*membership.members(), body.worker)),
                           lambda: self._regroup_done(f"rejoin of worker {body.worker}", [body.worker])]
            return {"rejoining": body.worker}

        @app.post("/ft/drain")
        async def drain(body: WorkerRequest):
            membership.set_state(body.worker, WorkerState.DEAD)
            self._regroup(tuple(w for w in membership.members() if w != body.worker))
            self.script = [lambda: None, lambda: self._regroup_done(f"drain of worker {body.worker}", [])]
            return {"draining": body.worker}

        return app

    def posts(self) -> list[tuple[str, dict, str]]:
        return [(path, body, auth) for method, path, body, auth in self.requests if method == "POST"]

    def status_polls(self) -> int:
        return sum(1 for method, path, _, _ in self.requests if path == "/ft/status")


@pytest.fixture
def fake():
    server = FakeFtServer()
    with serving(server.app) as server.url:
        yield server


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """rich sizes tables to COLUMNS when not on a terminal; wide enough that no cell wraps."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SGLANG_API_KEY", raising=False)
    monkeypatch.delenv("SGLANG_ADMIN_API_KEY", raising=False)


def _run(capsys, fake: FakeFtServer, *argv: str, key: str | None = KEY) -> tuple[int, str, str]:
    flags = ["--url", fake.url] + (["--api-key", key] if key else [])
    code = ctl.main([*flags, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(out: str, separator: str = "│") -> list[list[str]]:
    """The cells of rich's table lines: "│" separates a row's cells, "┃" a header's."""
    return [[cell.strip() for cell in line.split(separator)] for line in out.splitlines() if separator in line]


def test_status_tables(capsys, fake):
    code, out, err = _run(capsys, fake, "status")
    assert code == 0 and err == ""
    workers_header, recoveries_header = [
        [" ".join(filter(None, cells)) for cells in zip(*_rows(out, "┃")[i:i + 2])] for i in (0, 2)]
    assert workers_header == ["worker", "rank", "pid", "state", "kv heads", "kv_bytes used", "outstanding tokens",
                              "last_step ms", "kv_backup dropped", "kv_backup bytes"]
    assert recoveries_header == ["epoch", "cause", "detect ms", "recover ms", "bytes p2p", "bytes_from_host cache",
                                 "bytes reloaded", "kv_blocks restored", "kv_tokens recomputed", "joined"]
    rows = _rows(out)
    workers = {row[0]: row for row in rows[:4]}
    assert workers["0"] == ["0", "0", "1000", "healthy", "3", "300.0 KiB", "40", "12.5", "0", "1.0 MiB"]
    assert workers["2"] == ["2", "-", "1002", "dead", "-", "-", "-", "-", "2", "3.0 MiB"]  # no load: not a member
    assert workers["3"][1:6] == ["2", "1003", "suspect", "2", "200.0 KiB"]
    assert re.search(r"epoch 1\s+tp_size 3\s+regrouping no\s+kv_backup healthy\s+kv_blocks_restored 12\s+"
                     r"kv_tokens_recomputed 0\s+weight_cache off", out)
    assert rows[4:] == [["1", "worker 2: no heartbeat for 2000 ms", "2012.4", "845.2", "3.0 MiB", "2.0 MiB", "0 B",
                         "12", "0", "-"]]
    assert fake.requests == [("GET", "/ft/status", None, f"Bearer {KEY}")]


def test_status_json_round_trips(capsys, fake):
    code, out, _ = _run(capsys, fake, "status", "--json")
    assert code == 0
    printed, served = json.loads(out), json.loads(json.dumps(fake.state.status(time.monotonic())))
    for status in (printed, served):
        for worker in status["workers"]:
            worker.pop("last_beat_ms_ago")  # moves on between the two calls
    assert printed == served
    assert [w["state"] for w in printed["workers"]] == ["healthy", "healthy", "dead", "suspect"]


def test_api_key_from_environment_and_flags_after_the_subcommand(capsys, fake, monkeypatch):
    monkeypatch.setenv("SGLANG_API_KEY", KEY)
    assert ctl.main(["status", "--url", fake.url, "--json"]) == 0
    assert fake.requests[-1][3] == f"Bearer {KEY}"


def test_watch_refreshes_count_times(capsys, fake):
    code, out, _ = _run(capsys, fake, "watch", "--interval", "0.05", "--count", "3")
    assert code == 0 and fake.status_polls() == 3
    assert "dead" in out and "kv_blocks_restored 12" in out


def test_inject_sends_rank_and_kind(capsys, fake):
    code, out, _ = _run(capsys, fake, "inject", "--rank", "1", "--kind", "hang")
    assert code == 0
    assert fake.posts() == [("/ft/inject_fault", {"rank": 1, "kind": "hang", "dp_rank": 0}, f"Bearer {KEY}")]
    assert "injected hang into rank 1 (worker 1, pid 1001)" in out


def test_drain_and_rejoin_send_the_worker(capsys, fake):
    assert _run(capsys, fake, "drain", "--worker", "1")[0] == 0
    assert _run(capsys, fake, "rejoin", "--worker", "2", "--dp-rank", "1")[0] == 0
    assert fake.posts() == [("/ft/drain", {"worker": 1, "dp_rank": 0}, f"Bearer {KEY}"),
                            ("/ft/rejoin", {"worker": 2, "dp_rank": 1}, f"Bearer {KEY}")]
    assert fake.status_polls() == 0


def test_rejoin_wait_polls_until_healthy_member(capsys, fake):
    code, out, err = _run(capsys, fake, "rejoin", "--worker", "2", "--wait", "--interval", "0.05")
    assert code == 0, err
    assert fake.status_polls() == 3  # joining, then in the group but joining, then healthy
    assert "worker 2 rejoined: epoch 2, tp_size 4" in out


def test_drain_wait_polls_until_out_and_regrouped(capsys, fake):
    code, out, err = _run(capsys, fake, "drain", "--worker", "1", "--wait", "--interval", "0.05")
    assert code == 0, err
    assert fake.status_polls() == 2  # out of the group at once; the regroup without it ends on the second poll
    assert "worker 1 drained: epoch 2, tp_size 2" in out


def test_wait_gives_up_after_wait_timeout(capsys, fake):
    fake.stuck = True
    code, _, err = _run(capsys, fake, "rejoin", "--worker", "2", "--wait", "--interval", "0.05",
                        "--wait-timeout", "0.2")
    assert code == 1
    assert "worker 2 was not rejoined within 0.2 s (--wait-timeout); it is dead, rank -" in err
    assert fake.status_polls() >= 2


def test_http_403_prints_the_servers_message(capsys, fake):
    fake.fault_injection = False
    code, out, err = _run(capsys, fake, "inject", "--rank", "0", "--kind", "kill")
    assert code == 1 and out == ""
    assert "HTTP 403" in err and "start the server with --ft-enable-fault-injection" in err


def test_wrong_key_is_refused(capsys, fake):
    code, _, err = _run(capsys, fake, "status", key="wrong")
    assert code == 1 and "HTTP 401: Unauthorized (check --api-key or $SGLANG_API_KEY)" in err
    assert fake.requests[-1][3] == "Bearer wrong"


def test_under_an_admin_key_the_operations_carry_it_and_status_the_api_key(capsys, fake, monkeypatch):
    fake.admin_key = "sk-admin"
    code, _, err = _run(capsys, fake, "drain", "--worker", "1")
    assert code == 1 and "HTTP 401: Unauthorized (check --admin-api-key or $SGLANG_ADMIN_API_KEY" in err
    monkeypatch.setenv("SGLANG_ADMIN_API_KEY", "sk-admin")
    code, _, err = _run(capsys, fake, "drain", "--worker", "1", "--wait", "--interval", "0.05")
    assert code == 0, err
    assert fake.posts()[-1] == ("/ft/drain", {"worker": 1, "dp_rank": 0}, "Bearer sk-admin")
    assert {auth for method, _, _, auth in fake.requests if method == "GET"} == {f"Bearer {KEY}"}


def test_validation_error_names_the_field(capsys, fake):
    code, _, err = _run(capsys, fake, "inject", "--rank", "-1", "--kind", "kill")
    assert code == 1 and "HTTP 422" in err and "rank:" in err and "greater than or equal to 0" in err


def test_unreachable_server_exits_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert ctl.main(["--url", url, "status"]) == 2
    assert f"not reachable at {url}" in capsys.readouterr().err


def test_bad_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ctl.main(["inject", "--rank", "0", "--kind", "explode"])
    assert exit_info.value.code == 2
    assert "--kind" in capsys.readouterr().err


def test_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "sglang_ft.ctl", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in ("status", "watch", "inject", "drain", "rejoin"))


@pytest.mark.parametrize("command", ["status", "watch", "inject", "drain", "rejoin"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        ctl.main([command, "--help"])
    assert exit_info.value.code == 0 and "--url" in capsys.readouterr().out


def test_a_worker_under_hybrid_attention_shows_its_tp_and_remainder_heads():
    from sglang_ft import ctl

    assert ctl._heads({"kv_heads": 2, "remainder_kv_heads": 2}) == "2+2"
    assert ctl._heads({"kv_heads": 3, "remainder_kv_heads": 0}) == "3" and ctl._heads({}) == "-"


def test_status_under_dp_size_shows_each_replica_and_the_routing(capsys):
    from rich.console import Console

    from sglang_ft import ctl

    one = {"epoch": 0, "tp_size": 2, "workers": [{"worker": 0, "rank": 0, "pid": 7, "state": "healthy"}],
           "recoveries": [], "serving": True}
    status = {"dp_size": 2, "replicas": [one, {**one, "epoch": 2, "serving": False}],
              "routing": {"policy": "prefix_load", "live_replicas": [0], "lost": [1], "moved_requests": 3,
                          "moved_tokens_kv_taken_over": 57, "moved_tokens_recomputed": 4}}
    Console(width=160).print(ctl.render_status(status))
    out = capsys.readouterr().out
    assert "replica 0 (serving)" in out and "replica 1 (lost)" in out
    assert re.search(r"routing prefix_load\s+live 0\s+lost 1\s+moved_requests 3\s+kv_taken_over 57\s+"
                     r"recomputed 4", out)
