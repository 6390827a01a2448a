"""Tell a client turned away by a full queue when to come back.

SGLang already bounds admission (`--max-queued-requests`: beyond it a request is aborted with 503 "The request
queue is full.") but answers without `Retry-After`, so well-behaved clients retry at once and the flood goes on.
This pure ASGI middleware (no per-request cost beyond one comparison, streaming untouched) adds the header to every
503 that lacks one. Under `--ft` the queue is bounded by default (see `server_args.py`), so memory never grows
without bound under a flood.
"""

from __future__ import annotations

RETRY_AFTER_S = 1


class RetryAfterOn503:
    def __init__(self, app, seconds: int = RETRY_AFTER_S):
        self.app = app
        self.header = (b"retry-after", str(seconds).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message.get("status") == 503:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_retry_after)
