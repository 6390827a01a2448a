"""The HTTP side of fault events and readiness: `GET /ft/events` (Server-Sent Events), `GET /ft/ready`, SGLang's
`/ready` answering 503 while no group can serve, and its health probes kept at 200 through a regroup.

A feed thread in the HTTP server's process polls every replica's FT controller for new events over the control
socket that serves `/ft/status` (a REQ/REP round trip each `POLL_S`), and puts them in one `ft.events.EventHub`:
the SSE clients and the `--ft-events-endpoint` PUB socket get them from there, never from the controller, so no
client can slow the controller. Each poll also brings the replica's readiness (`ft.events.readiness`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ft.events import EventHub, PubSocket, fresh, parse_last_event_id, sse_frame
from ft.messages import ControlRequest

logger = logging.getLogger(__name__)
POLL_S = 0.1
KEEPALIVE_S = 15.0  # an SSE comment on an idle stream, so proxies keep it open and a dead client is noticed
HEALTH_PATHS = ("/health", "/health_generate")


class EventFeed:
    """Polls the controllers (one per data-parallel replica) and keeps the hub and their readiness current."""

    def __init__(self, ft, hub: EventHub, ask):
        self.replicas = [ft.for_replica(k) for k in range(ft.dp_size)]
        self.hub = hub
        self.ask = ask  # ask_controller(ft, request) -> dict (entrypoints/ft_runtime.py)
        self.last_ids = [0] * len(self.replicas)
        self.ready: list[dict | None] = [None] * len(self.replicas)  # None until the replica's controller answers
        self.regroups = 0  # regroup_started events seen: a health probe that spans one is not failed by it
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ft-event-feed", daemon=True)

    def start(self) -> "EventFeed":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            for k in range(len(self.replicas)):
                try:
                    self.poll(k)
                except Exception:  # never let a bad reply end the feed
                    logger.exception("sglang-ft events: polling replica %d failed", k)

    def poll(self, k: int) -> None:
        reply = self.ask(self.replicas[k], ControlRequest("events", after=self.last_ids[k]))
        if "error" in reply:
            return
        self.hub.missed_upstream += reply["missed"]
        for event in reply["events"]:
            self.regroups += event["type"] == "regroup_started"
            self.hub.publish(event)
        self.last_ids[k] = reply["last_id"]
        self.ready[k] = reply["ready"]

    def can_serve(self) -> bool:
        """Some replica can serve (or none has answered yet: SGLang's own start-up check covers that time)."""
        known = [r for r in self.ready if r is not None]
        return not known or any(r["ready"] for r in known)

    def regrouping(self) -> bool:
        return any(r is not None and r["regrouping"] for r in self.ready)

    def body(self) -> dict:
        """`/ft/ready`'s body: the replica's readiness, or under --dp-size each replica's and whether any serves."""
        if len(self.ready) == 1:
            return self.ready[0] or {"ready": False, "reason": "the FT controller has not answered yet"}
        return {"ready": self.can_serve(), "replicas": self.ready}


FEED: EventFeed | None = None


def start_event_feed(ft, ask_controller) -> EventFeed:
    """In the HTTP server's process, once the controllers are started: the hub, its PUB socket, the feed thread
    polling each controller through `ask_controller(ft, request)` (entrypoints/ft_runtime.py)."""
    global FEED
    publish = PubSocket(ft.events_endpoint) if ft.events_endpoint else None
    if publish is not None:
        logger.info("sglang-ft: fault events published on %s", ft.events_endpoint)
    FEED = EventFeed(ft, EventHub(publish=publish), ask_controller).start()
    return FEED


def around_is_ready(original, tokenizer_manager, *args, **kwargs) -> bool:
    """SGLang's `/ready`: also 503 while no group can serve (every worker lost, a regroup failed)."""
    return original(tokenizer_manager, *args, **kwargs) and (FEED is None or FEED.can_serve())


def _sglang_ready() -> bool:
    manager = _tokenizer_manager()
    return manager is not None and manager.is_ready()


async def _event_stream(request: Request, last_id: int | None):
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    subscriber, replay = FEED.hub.subscribe(last_id, lambda: loop.call_soon_threadsafe(wake.set))
    sent = last_id or 0
    try:
        out, sent = fresh(replay, sent)
        yield b": sglang-ft fault events\n\n" + b"".join(sse_frame(e) for e in out)
        while not subscriber.dropped:
            wake.clear()
            out, sent = fresh(subscriber.take(), sent)
            if out:
                yield b"".join(sse_frame(e) for e in out)
                continue
            try:
                await asyncio.wait_for(wake.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield b": keepalive\n\n"
    finally:
        FEED.hub.unsubscribe(subscriber)


def add_event_routes(app: FastAPI) -> None:
    """`/ft/events` and `/ft/ready` are ordinary routes (SGLang's --api-key, where set, like `/ft/status`)."""

    @app.get("/ft/events")
    async def ft_events(request: Request):
        """Fault events as Server-Sent Events; `Last-Event-ID` (or `?last_event_id=`) replays what came after it."""
        try:
            last_id = parse_last_event_id(request.headers.get("last-event-id",
                                                              request.query_params.get("last_event_id")))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if FEED is None:
            return JSONResponse({"error": "the FT event feed is not running"}, status_code=503)
        return StreamingResponse(_event_stream(request, last_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/ft/events/stats")
    async def ft_events_stats() -> JSONResponse:
        """Clients connected and dropped, the ring's size and newest id."""
        if FEED is None:
            return JSONResponse({"error": "the FT event feed is not running"}, status_code=503)
        stats = FEED.hub.stats()
        if FEED.hub.publish_out is not None:
            stats["pub"] = {"endpoint": FEED.hub.publish_out.endpoint, "sent": FEED.hub.publish_out.sent}
        return JSONResponse(stats)

    @app.get("/ft/ready")
    async def ft_ready() -> JSONResponse:
        """SGLang's `/ready` answer (200 or 503) with why: tp_size, launch width, degraded, reason."""
        body = dict(FEED.body()) if FEED is not None else {"ready": True, "reason": None}
        if body["ready"] and not _sglang_ready():
            body.update(ready=False, reason="SGLang is not ready (starting, unhealthy or shutting down)")
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    app.add_middleware(HealthThroughRegroup)


class HealthThroughRegroup:
    """SGLang's `/health` and `/health_generate` stay 200 through a regroup: a probe that arrives during one is
    answered at once (the server is recovering, not dead: a liveness probe must not restart it), and one that
    waited across one (its 1-token request parked by the regroup past SGLang's timeout) is not failed by it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in HEALTH_PATHS or FEED is None:
            return await self.app(scope, receive, send)
        if FEED.regrouping() and FEED.can_serve() and not _shutting_down():
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return await send({"type": "http.response.body", "body": b""})
        regroups, started = FEED.regroups, time.monotonic()

        async def send_through_regroup(message):
            if message["type"] == "http.response.start" and message.get("status") == 503 and FEED.can_serve() \
                    and (FEED.regroups != regroups or FEED.regrouping()) and not _shutting_down():
                _mark_up()
                logger.warning("sglang-ft: a health probe waited %.1f s across a regroup; answered 200",
                               time.monotonic() - started)
                message = {**message, "status": 200}
            await send(message)

        return await self.app(scope, receive, send_through_regroup)


def _tokenizer_manager():
    from sglang_ft.sglang_surface import http_server_state as _global_state

    return getattr(_global_state, "tokenizer_manager", None)


def _shutting_down() -> bool:
    manager = _tokenizer_manager()
    return manager is None or manager.gracefully_exit


def _mark_up() -> None:
    """Undo SGLang's UnHealthy mark of a probe failed only by a regroup (it would fail `/ready` until the next)."""
    from sglang_ft.sglang_surface import ServerStatus

    _tokenizer_manager().server_status = ServerStatus.Up
