"""How `python -m sglang_ft.ctl` reports a failure: one line on stderr and an exit code (shared by its commands)."""

from __future__ import annotations

import json

import requests

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2


class CtlError(Exception):
    """A failure to report in one line on stderr, with the exit code it maps to."""

    def __init__(self, message: str, code: int = EXIT_REFUSED):
        super().__init__(message)
        self.code = code


def server_message(response: requests.Response) -> str:
    """The body's "error" (the /ft/* routes, the API-key check) or "detail" (FastAPI's validation of a body)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason
    message = (body.get("error") or body.get("detail")) if isinstance(body, dict) else None
    if isinstance(message, list):  # FastAPI 422: [{"loc": [...], "msg": ...}, ...]
        message = "; ".join(f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
                            for item in message)
    return str(message) if message else json.dumps(body)
