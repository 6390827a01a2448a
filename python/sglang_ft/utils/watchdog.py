"""Adapter of `sglang.srt.utils.watchdog`: a dead scheduler is the FT controller's to recover, not a dead server."""

from __future__ import annotations

from sglang_ft.server_args import ft_enabled


def around_watchdog_check(original, watchdog, *args, **kwargs):
    """Under `--ft`, a dead scheduler is the FT controller's to recover; the launcher stays up while any lives."""
    if not ft_enabled():
        return original(watchdog, *args, **kwargs)
    schedulers = [(p, n) for p, n in zip(watchdog._processes, watchdog._names) if n.startswith("scheduler")]
    others = [(p, n) for p, n in zip(watchdog._processes, watchdog._names) if not n.startswith("scheduler")]
    from sglang_ft.entrypoints.worker_spawner import restarted_worker_alive

    if schedulers and not any(p.is_alive() for p, _ in schedulers) and not restarted_worker_alive():
        others = schedulers + others  # every TP worker is gone, restarted ones too: nothing left to recover with
    saved = watchdog._processes, watchdog._names
    watchdog._processes, watchdog._names = [p for p, _ in others], [n for _, n in others]
    try:
        return original(watchdog, *args, **kwargs)
    finally:
        watchdog._processes, watchdog._names = saved
