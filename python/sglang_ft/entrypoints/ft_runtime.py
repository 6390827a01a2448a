"""Start sglang-ft's runtime beside SGLang's processes and add the `/ft/*` routes to SGLang's FastAPI app.

Called (through a BEFORE hook on SGLang's `http_server.launch_server`) in the launcher process before SGLang
spawns its schedulers, so they inherit the controller's endpoints through the environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import tempfile
from typing import Literal

import msgspec
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ft.controller import spawn_controller
from ft.faults import FAULT_HELP, FAULT_KINDS
from ft.messages import ControlRequest, encode_control
from ft.sockets import process_keys, request
from sglang_ft.server_args import FtArgs, ft_args, publish

logger = logging.getLogger(__name__)
CONTROL_TIMEOUT_MS = 3000


class InjectFaultRequest(BaseModel):
    """Body of POST /ft/inject_fault."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(ge=0, description="current TP rank of the worker to fault")
    dp_rank: int = Field(0, ge=0, description="the data-parallel replica of the worker (under --dp-size)")
    kind: Literal[FAULT_KINDS] = Field(description=FAULT_HELP)


class WorkerRequest(BaseModel):
    """Body of POST /ft/rejoin and /ft/drain."""

    model_config = ConfigDict(extra="forbid")
    worker: int = Field(ge=0, description="the worker (its launch TP rank)")
    dp_rank: int = Field(0, ge=0, description="the data-parallel replica of the worker (under --dp-size)")


def join_ft_runtime(model_path: str) -> None:
    """On a node other than 0: no controller, store, journal or routes here; a runtime directory of its own (for
    what its processes keep locally), this node's weight cache and the controller's TCP endpoints, already in the
    published options."""
    ft = dataclasses.replace(ft_args(), runtime_dir=tempfile.mkdtemp(prefix="sglang-ft-"))
    ft = with_weight_cache(ft, model_path)
    publish(ft)
    logger.info("sglang-ft: node %d of %d; FT controller at %s", ft.node_rank, ft.nnodes, ft.heartbeat_endpoint)


def start_ft_runtime(tp_size: int, model_path: str, app: FastAPI,
                     enable_metrics: bool = False) -> list[subprocess.Popen]:
    """Make the runtime directory, start the FT controller (one per data-parallel replica), publish their endpoints,
    add the routes."""
    ft = dataclasses.replace(ft_args(), runtime_dir=tempfile.mkdtemp(prefix="sglang-ft-"))
    ft = with_weight_cache(ft, model_path)
    publish(ft)
    if enable_metrics:  # before the spawn: the controller inherits it and writes its metrics there
        from ft.metrics import prepare_multiproc_dir

        prepare_multiproc_dir(ft.runtime_dir)
    replicas = [ft.for_replica(k) for k in range(ft.dp_size)]
    processes = []
    for replica in replicas:
        os.makedirs(replica.runtime_dir, exist_ok=True)
        processes.append(spawn_controller(replica.controller_options(tp_size, model_path), os.getpid()))
        logger.info("sglang-ft: controller pid %d, runtime dir %s", processes[-1].pid, replica.runtime_dir)
    add_ft_routes(app, ft)
    from sglang_ft.entrypoints.ft_events import start_event_feed

    start_event_feed(ft, ask_controller)
    from sglang_ft.entrypoints.overload import RetryAfterOn503

    app.add_middleware(RetryAfterOn503)
    from sglang_ft.managers.tokenizer_manager_components.sent_requests import JOURNAL

    JOURNAL.follow_orders([replica.order_endpoint for replica in replicas], ft.routing,
                          [replica.kv_fetch_endpoint if ft.kv_backup else None for replica in replicas])
    if ft.dp_size == 1:  # restarts need SGLang's launch arguments, which only a single group's launcher holds
        from sglang_ft.entrypoints.worker_spawner import WorkerSpawner

        WorkerSpawner(ft.order_endpoint, prepare_at_first_regroup=ft.respawn)
    return processes


def with_weight_cache(ft: FtArgs, model_path: str) -> FtArgs:
    """Under `--ft-weight-cache host`, start this node's holder of the checkpoint's copy in host memory
    (ft/weight_cache.py) and name its directory in the options, which the schedulers spawned later inherit. Without
    a GPU the workers' weights take host memory too, so the copy's bound leaves room for them."""
    import torch

    from ft.weight_cache import SHM_ROOT, cache_dir_for, checkpoint_files, spawn_holder

    if ft.weight_cache != "host":
        return ft
    if not os.path.isdir(SHM_ROOT):
        logger.warning("sglang-ft: --ft-weight-cache host is off: this node has no %s (tmpfs); a lost worker's "
                       "slices are read from disk", SHM_ROOT)
        return ft
    cache_dir = cache_dir_for(os.getpid())
    weights_on_host = 0 if torch.cuda.is_available() else sum(os.path.getsize(f) for f in checkpoint_files(model_path))
    try:
        holder = spawn_holder(model_path, cache_dir, os.getpid(), int(ft.weight_cache_max_gb * 2**30), weights_on_host)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:  # serving goes on without the cache
        logger.warning("sglang-ft: --ft-weight-cache host is off: its holder did not start (%s); a lost worker's "
                       "slices are read from disk", exc)
        return ft
    logger.info("sglang-ft: weight cache holder pid %d, copying %s to %s", holder, model_path, cache_dir)
    return dataclasses.replace(ft, weight_cache_dir=cache_dir)


def ask_controller(ft: FtArgs, control: ControlRequest) -> dict:
    """One request/reply with the controller (a fresh REQ socket each time, so a lost reply never wedges it)."""
    frames = request(ft.control_endpoint, [encode_control(control)], CONTROL_TIMEOUT_MS, process_keys())
    if frames is None:
        return {"error": "the FT controller did not answer", "code": 503}
    try:
        reply = msgspec.json.decode(frames[0])
    except msgspec.DecodeError:
        reply = None
    return reply if isinstance(reply, dict) else {"error": "the FT controller's reply is malformed", "code": 502}


def _respond(reply: dict) -> JSONResponse:
    code = reply.pop("code", 200) if "error" in reply else 200
    return JSONResponse(reply, status_code=code)


def _no_such_replica(ft: FtArgs, dp_rank: int) -> JSONResponse | None:
    if dp_rank < ft.dp_size:
        return None
    return JSONResponse({"error": f"dp_rank {dp_rank} is out of range: the server runs --dp-size {ft.dp_size}"},
                        status_code=400)


async def _ask(ft: FtArgs, dp_rank: int, request: ControlRequest) -> JSONResponse:
    return _no_such_replica(ft, dp_rank) or _respond(
        await asyncio.to_thread(ask_controller, ft.for_replica(dp_rank), request))


async def replicas_status(ft: FtArgs) -> JSONResponse:
    """Under --dp-size: every replica's controller's status, and how the tokenizer routes between them."""
    from sglang_ft.managers.tokenizer_manager_components.sent_requests import JOURNAL

    replies = await asyncio.gather(*(asyncio.to_thread(ask_controller, ft.for_replica(k), ControlRequest("status"))
                                     for k in range(ft.dp_size)))
    return JSONResponse({"dp_size": ft.dp_size, "replicas": replies, "routing": JOURNAL.routing_status()})


def add_ft_routes(app: FastAPI, ft: FtArgs) -> None:
    """`/ft/status` is an ordinary route (SGLang's --api-key, where set); inject, rejoin and drain are admin
    operations, at SGLang's admin level: --admin-api-key where set, else --api-key (SGLang's own middleware checks
    both before a route runs)."""
    from sglang_ft.sglang_surface import AuthLevel, auth_level

    admin = auth_level(AuthLevel.ADMIN_OPTIONAL)
    if any(getattr(route, "path", None) == "/ft/status" for route in app.routes):
        return
    from sglang_ft.entrypoints.ft_events import add_event_routes

    add_event_routes(app)

    @app.get("/ft/status")
    async def ft_status() -> JSONResponse:
        if ft.dp_size > 1:
            return await replicas_status(ft)
        return _respond(await asyncio.to_thread(ask_controller, ft, ControlRequest("status")))

    @app.post("/ft/inject_fault")
    @admin
    async def ft_inject_fault(body: InjectFaultRequest) -> JSONResponse:
        if not ft.enable_fault_injection:
            return JSONResponse(
                {"error": "fault injection is disabled; start the server with --ft-enable-fault-injection"},
                status_code=403,
            )
        return await _ask(ft, body.dp_rank, ControlRequest("inject", rank=body.rank, kind=body.kind))

    @app.post("/ft/rejoin")
    @admin
    async def ft_rejoin(body: WorkerRequest) -> JSONResponse:
        """Restart a dead worker and plan it back into the group."""
        if ft.dp_size > 1:
            return JSONResponse({"error": "rejoin is not supported with --dp-size > 1 yet (a replica's workers are "
                                          "started by SGLang's data-parallel controller)"}, status_code=400)
        return await _ask(ft, body.dp_rank, ControlRequest("rejoin", worker=body.worker))

    @app.post("/ft/drain")
    @admin
    async def ft_drain(body: WorkerRequest) -> JSONResponse:
        """Take a healthy worker out of the group (the others regroup without it) until it is rejoined."""
        return await _ask(ft, body.dp_rank, ControlRequest("drain", worker=body.worker))
