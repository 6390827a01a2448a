"""Adapter of `sglang.srt.entrypoints.http_server`: the FT runtime and its `/ft/*` routes start with the server."""

from __future__ import annotations

from sglang_ft.server_args import ft_args, ft_enabled


def before_launch_server(server_args, *args, **kwargs):
    """Under `--ft`, start the FT controller and add the `/ft/*` routes before SGLang spawns its schedulers."""
    if ft_enabled():
        from sglang.srt.entrypoints import http_server

        from sglang_ft.entrypoints.ft_runtime import join_ft_runtime, start_ft_runtime

        if ft_args().node_rank > 0:  # the controller runs on node 0; this node's workers reach it over TCP
            join_ft_runtime(server_args.model_path)
            return
        start_ft_runtime(server_args.tp_size, server_args.model_path, http_server.app,
                         server_args.enable_metrics)
