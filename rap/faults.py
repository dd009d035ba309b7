"""Fault injection for the kill tests: with ``RAP_KILL_AT=<point>[@<run name>]`` the process SIGKILLs itself on
reaching that point (of that job), the way a preempted or OOM-killed job dies: no handler or cleanup runs.
Points: every timed phase of the job (``Run.phase``: ``load``, ``baseline``, ``compress``, ``heal``, ``measure``,
``latency``, and each evaluation by its key, ``rap.harness.evaluators``), ``finish`` (W&B), and ``write:<file>``
between a result file's complete temp copy and its rename."""
from __future__ import annotations

import os
import signal

KILL_ENV = "RAP_KILL_AT"
_current_run: str | None = None


def set_current_run(name: str | None) -> None:
    global _current_run
    _current_run = name


def kill_point(point: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want, _, run = spec.partition("@")
    if want == point and (not run or run == _current_run):
        os.kill(os.getpid(), signal.SIGKILL)
