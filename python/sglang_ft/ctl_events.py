"""`python -m sglang_ft.ctl events`: follow a server's fault events (`GET /ft/events`), one JSON line each.

It reconnects by itself with `Last-Event-ID` (nothing still in the server's ring is missed; an `events_missed`
notice says when something was), so it can run for as long as the server does.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Iterator

import requests

from sglang_ft.ctl_errors import EXIT_REFUSED, EXIT_UNREACHABLE, CtlError, server_message

RECONNECT_S = 1.0


def read_events(response: requests.Response) -> Iterator[dict]:
    """The events of an open SSE response, each with its `id` (notices have none); comments skipped."""
    data: list[str] = []
    for raw in response.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        if raw == "":
            if data:
                yield json.loads("\n".join(data))
            data = []
        elif raw.startswith("data:"):
            data.append(raw[5:].lstrip(" "))


def follow(url: str, api_key: str | None, last_id: int | None = None, count: int | None = None,
           timeout: float = 10.0, out=sys.stdout) -> int:
    """Print events as JSON lines until `count` of them (notices included) or Ctrl-C; 2 if the server is not
    reachable at first, 1 if it refuses."""
    printed, connected = 0, False
    while count is None or printed < count:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if last_id is not None:
            headers["Last-Event-ID"] = str(last_id)
        try:
            # a read timeout far above the server's keepalive comments (every 15 s): a silent stream is a dead one
            with requests.get(f"{url.rstrip('/')}/ft/events", headers=headers, stream=True,
                              timeout=(timeout, 60.0)) as response:
                if not response.ok:
                    raise CtlError(f"GET /ft/events: HTTP {response.status_code}: {server_message(response)}",
                                   EXIT_REFUSED)
                connected = True
                for event in read_events(response):
                    print(json.dumps(event), file=out, flush=True)
                    last_id = event.get("id", last_id)
                    printed += 1
                    if count is not None and printed >= count:
                        return 0
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
            if not connected:
                raise CtlError(f"the server is not reachable at {url}: is it running, and is --url right?",
                               EXIT_UNREACHABLE) from None
        time.sleep(RECONNECT_S)  # the stream ended (a restart, a dropped slow client): go on after `last_id`
    return 0
