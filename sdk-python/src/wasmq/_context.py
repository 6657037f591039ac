"""The invocation a task serves (Celery's `self.request`) and what it may tell the worker:
log records, custom states, and the soft time left.

A task reaches it by declaring a first parameter named ``ctx`` (the SDK fills it; it is not
one of the task's parameters for callers), or from anywhere during a call with
``wasmq.current()``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from ._errors import Retry

_LEVELS = {
    "trace": "trace",
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "critical": "error",
    "fatal": "error",
    "exception": "error",
}


def level_name(level: Any) -> str:
    """One of the host's levels (`trace`, `debug`, `info`, `warn`, `error`) for a level name
    or a `logging` number."""
    if isinstance(level, int) and not isinstance(level, bool):
        if level >= logging.ERROR:
            return "error"
        if level >= logging.WARNING:
            return "warn"
        if level >= logging.INFO:
            return "info"
        if level >= logging.DEBUG:
            return "debug"
        return "trace"
    name = _LEVELS.get(str(level).lower())
    if name is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {sorted(_LEVELS)}")
    return name


class Host:
    """What the host offers a task. The plugin's entry point installs the real one (the WIT
    `host` imports); outside a worker (unit tests) this one records to `logging`."""

    def log(self, level: str, message: str) -> None:
        logging.getLogger("wasmq.task").log(
            {"trace": 5, "debug": 10, "info": 20, "warn": 30, "error": 40}[level], message
        )

    def update_state(self, state: str, meta_json: str) -> None:
        logging.getLogger("wasmq.task").info("state %s %s", state, meta_json)

    def soft_time_left_ms(self) -> Optional[int]:
        return None


class Context:
    """One call of a task: its request fields and its line to the worker.

    ============================  ===============================================
    ``ctx.``                      Celery
    ============================  ===============================================
    ``id``, ``task``, ``retries`` ``request.id``, ``.task``, ``.retries``
    ``root_id``, ``parent_id``    ``request.root_id``, ``.parent_id``
    ``group``                     ``request.group``
    ``eta``, ``expires``          ``request.eta``, ``.expires`` (ISO-8601 text)
    ``time_limit``                ``request.time_limit`` (seconds, as the message asked)
    ``soft_time_limit``           ``request.soft_time_limit``
    ``redelivered``               ``request.delivery_info['redelivered']``
    ``priority``                  ``request.delivery_info['priority']``
    ``headers``                   ``request.headers`` (a dict, or None)
    ``properties``                ``request.properties`` (a dict)
    ============================  ===============================================
    """

    def __init__(self, host: Host, **fields: Any) -> None:
        self._host = host
        self.id: str = fields.get("id", "")
        self.task: str = fields.get("task", "")
        self.retries: int = fields.get("retries", 0)
        self.root_id: Optional[str] = fields.get("root_id")
        self.parent_id: Optional[str] = fields.get("parent_id")
        self.group: Optional[str] = fields.get("group")
        self.eta: Optional[str] = fields.get("eta")
        self.expires: Optional[str] = fields.get("expires")
        self.time_limit: Optional[float] = fields.get("time_limit")
        self.soft_time_limit: Optional[float] = fields.get("soft_time_limit")
        self.redelivered: bool = fields.get("redelivered", False)
        self.headers: Optional[dict] = fields.get("headers")
        self.properties: dict = fields.get("properties") or {}
        self.priority: Optional[int] = self.properties.get("priority")

    def __repr__(self) -> str:
        return f"<wasmq.Context {self.task}[{self.id}] retries={self.retries}>"

    def log(self, level: Any, message: str) -> None:
        """Writes a record to the worker's log, tagged with the task id and name. ``level``
        is `trace`, `debug`, `info`, `warn`/`warning` or `error`, or a `logging` level."""
        self._host.log(level_name(level), str(message))

    def debug(self, message: str) -> None:
        """Logs at debug level."""
        self.log("debug", message)

    def info(self, message: str) -> None:
        """Logs at info level."""
        self.log("info", message)

    def warning(self, message: str) -> None:
        """Logs at warn level."""
        self.log("warn", message)

    def error(self, message: str) -> None:
        """Logs at error level."""
        self.log("error", message)

    def update_state(self, state: str = "PROGRESS", meta: Any = None) -> None:
        """Reports a custom state with JSON metadata (Celery's ``update_state(state=, meta=)``).
        ``meta`` must be JSON-serialisable."""
        try:
            meta_json = json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"update_state({state!r}): meta is not JSON-serialisable: {e}") from None
        self._host.update_state(str(state), meta_json)

    def soft_time_left(self) -> Optional[float]:
        """Seconds left before the soft time limit in force, or None without one."""
        left = self._host.soft_time_left_ms()
        return None if left is None else left / 1000

    def should_stop(self) -> bool:
        """True once the soft time limit has passed: stop cleanly now, before the hard limit
        interrupts the task."""
        left = self._host.soft_time_left_ms()
        return left is not None and left == 0

    def retry(self, message: Optional[str] = None, **options: Any) -> Retry:
        """A `Retry` to raise, as Celery's ``raise self.retry(exc=e, countdown=5)``."""
        return Retry(message, **options)
