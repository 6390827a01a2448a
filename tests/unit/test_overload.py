"""Overload answers: 503 with Retry-After (the middleware, on a fake app), and the `--ft` default bound."""

import requests
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from sglang_ft.entrypoints.overload import RetryAfterOn503
from sglang_ft.server_args import FT_DEFAULT_MAX_QUEUED_REQUESTS

from tests.fake_http import serving


def app_with_answers() -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    async def full():
        return JSONResponse({"error": {"message": "The request queue is full."}}, status_code=503)

    @app.get("/own")
    async def own_retry_after():
        return JSONResponse({}, status_code=503, headers={"Retry-After": "7"})

    @app.get("/stream")
    async def stream():
        return StreamingResponse(iter([b"data: 1\n\n", b"data: 2\n\n"]), media_type="text/event-stream")

    app.add_middleware(RetryAfterOn503)
    return app


def test_a_503_tells_the_client_when_to_retry_and_nothing_else_changes():
    with serving(app_with_answers()) as url:
        full = requests.post(f"{url}/generate", json={})
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["message"] == "The request queue is full."
        assert requests.get(f"{url}/own").headers["Retry-After"] == "7"  # an answer's own value is kept
        streamed = requests.get(f"{url}/stream")
        assert streamed.status_code == 200 and "Retry-After" not in streamed.headers
        assert streamed.text == "data: 1\n\ndata: 2\n\n"


def test_ft_bounds_the_queue_by_default_and_keeps_an_explicit_bound(tiny_model, monkeypatch):
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    from sglang_ft.server_args import FT_ENV, ft_args

    load_plugins()
    monkeypatch.delenv(FT_ENV, raising=False)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)

    def parsed(*flags: str) -> ServerArgs:
        return ServerArgs.from_cli_args(parser.parse_args(["--model-path", tiny_model, *flags]))

    try:
        assert parsed("--ft").max_queued_requests == FT_DEFAULT_MAX_QUEUED_REQUESTS > 0
        assert parsed("--ft", "--max-queued-requests", "8").max_queued_requests == 8
        assert parsed().max_queued_requests is None  # upstream's default when --ft is off
    finally:
        ft_args.cache_clear()
