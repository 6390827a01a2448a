"""The `/ft/*` admin operations (inject, drain, rejoin) behind SGLang's own key check, at SGLang's admin level:
the real routes and SGLang's real middleware, no server behind them (the requests here are answered by the routes'
own checks, before any reaches a controller)."""

import pytest
import requests
from tests.fake_http import serving
from fastapi import FastAPI

from sglang_ft.entrypoints.ft_runtime import add_ft_routes
from sglang_ft.server_args import FtArgs

# each answered by the route itself, with a 4xx that says it ran: fault injection off, no such replica, no rejoin
# under --dp-size
OPERATIONS = {"/ft/inject_fault": ({"rank": 0, "kind": "kill"}, 403), "/ft/drain": ({"worker": 0, "dp_rank": 7}, 400),
              "/ft/rejoin": ({"worker": 0}, 400)}


def app_with(api_key: str | None, admin_api_key: str | None) -> FastAPI:
    from sglang.srt.utils.auth import add_api_key_middleware

    app = FastAPI()
    add_ft_routes(app, FtArgs(enabled=True, dp_size=2, runtime_dir="/nonexistent"))
    add_api_key_middleware(app, api_key=api_key, admin_api_key=admin_api_key)
    return app


@pytest.mark.parametrize("api_key, admin_api_key", [("sk-user", None), (None, "sk-admin"), ("sk-user", "sk-admin")])
def test_every_admin_operation_needs_the_admin_key_where_there_is_one_else_the_api_key(api_key, admin_api_key):
    needed = admin_api_key or api_key
    with serving(app_with(api_key, admin_api_key)) as url:
        for path, (body, answered) in OPERATIONS.items():
            for key in (None, "wrong", *{api_key, admin_api_key} - {needed, None}):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                assert requests.post(url + path, json=body, headers=headers, timeout=10).status_code == 401, \
                    (path, key)
            reply = requests.post(url + path, json=body, headers={"Authorization": f"Bearer {needed}"}, timeout=10)
            assert reply.status_code == answered, (path, reply.text)
