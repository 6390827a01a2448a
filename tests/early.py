"""Subprocesses that a few unit-test modules' fixtures need and that are slow to start (each imports SGLang: about
20 s of CPU), started at the first unit test so they run on the core the other unit tests leave free. Those modules
run last among the unit tests (`tests/conftest.py` orders them), by which time the work is done. A module opts in
with a `start_early(request)` function; its fixture calls `taken(request, start_early)`, which returns what was
started for it early, or starts it then (the module run on its own)."""

from __future__ import annotations

import os
import subprocess
import tempfile

NICENESS = 10  # background work: the tests in the foreground keep their core
_started: dict[str, object] = {}  # module name -> what its `start_early` returned
_once: list[bool] = []


def start_once(request) -> None:
    """Call the `start_early` of each module of the session's tests that has one (the first time only: later calls
    do nothing)."""
    if not _once:
        _once.append(True)
        for module in {item.module for item in request.session.items if hasattr(item.module, "start_early")}:
            _started[module.__name__] = module.start_early(request)


def taken(request, start_early):
    name = request.module.__name__
    return _started.pop(name) if name in _started else start_early(request)


def niced(target, *args) -> None:
    """A process entry point (picklable for `spawn`): `target(*args)` at the background's priority."""
    os.nice(NICENESS)
    target(*args)


class Background:
    """A command run at the background's priority, its output in files (a pipe it filled would stall it)."""

    def __init__(self, argv: list[str]):
        self.out, self.err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.err, text=True,
                                     preexec_fn=lambda: os.nice(NICENESS))

    def result(self, timeout_s: float = 300) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=timeout_s)
        outputs = []
        for file in (self.out, self.err):
            file.seek(0)
            outputs.append(file.read())
            file.close()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, *outputs)
