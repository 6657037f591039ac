"""The plugin's entry point inside the component: the WIT `plugin` export (`describe`, `run`)
over the task table, and the WIT `host` imports behind `Context`.

componentize-py wraps a module that defines ``Plugin``; `wasmq plugins build` generates that
module (``import tasks; from wasmq._guest import Plugin``). This file imports the bindings
componentize-py generates (`wit_world`), so it is only imported when building a plugin.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host as wit_host
from wit_world.imports import types

# Imported now so the component holds it: CPython encodes every socket host name with the
# `idna` codec, and without it a task's socket call fails with "unknown encoding: idna"
# instead of the sandbox's own refusal.
import encodings.idna  # noqa: F401

from ._context import Host
from ._task import REGISTRY, Outcome

_LEVELS = {
    "trace": types.LogLevel.TRACE,
    "debug": types.LogLevel.DEBUG,
    "info": types.LogLevel.INFO,
    "warn": types.LogLevel.WARN,
    "error": types.LogLevel.ERROR,
}


class WitHost(Host):
    """The worker, through the WIT `host` imports."""

    def log(self, level: str, message: str) -> None:
        wit_host.log(_LEVELS[level], message)

    def update_state(self, state: str, meta_json: str) -> None:
        wit_host.update_state(state, meta_json)

    def soft_time_left_ms(self) -> Optional[int]:
        return wit_host.soft_time_left_ms()


_HOST = WitHost()


class _LogHandler(logging.Handler):
    """Sends the `logging` records of a task to the worker's log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from ._context import level_name

            _HOST.log(level_name(record.levelno), self.format(record))
        except Exception:  # noqa: BLE001 - logging never fails a task
            pass


# Unless the plugin configured logging itself, its records go to the worker's log.
logging.basicConfig(level=logging.INFO, handlers=[_LogHandler()])


def _request(inv: types.Invocation) -> dict:
    p = inv.properties
    headers = None
    if inv.headers_json:
        try:
            headers = json.loads(inv.headers_json)
        except ValueError:
            headers = None
    return {
        "id": inv.id,
        "task": inv.task,
        "retries": inv.retries,
        "root_id": inv.root_id,
        "parent_id": inv.parent_id,
        "group": inv.group_id,
        "eta": inv.eta,
        "expires": inv.expires,
        "time_limit": None if inv.time_limit_ms is None else inv.time_limit_ms / 1000,
        "soft_time_limit": None if inv.soft_time_limit_ms is None else inv.soft_time_limit_ms / 1000,
        "redelivered": inv.redelivered,
        "headers": headers,
        "properties": {
            k: v
            for k, v in {
                "content_type": p.content_type,
                "content_encoding": p.content_encoding,
                "correlation_id": p.correlation_id,
                "reply_to": p.reply_to,
                "delivery_mode": p.delivery_mode,
                "priority": p.priority,
                "expiration": p.expiration,
                "message_id": p.message_id,
                "timestamp": p.timestamp,
                "type": p.message_type,
                "app_id": p.app_id,
            }.items()
            if v is not None
        },
    }


def _failure(parts: tuple) -> types.Failure:
    kind, message, args_json = parts
    return types.Failure(kind=kind, message=message, args_json=args_json)


def _error(outcome: Outcome) -> types.TaskError:
    if outcome.failed is not None:
        return types.TaskError_Failed(_failure(outcome.failed))
    if outcome.retry is not None:
        r = dict(outcome.retry)
        r["exc"] = None if r["exc"] is None else _failure(r["exc"])
        return types.TaskError_Retry(types.RetryRequest(**r))
    if outcome.reject is not None:
        reason, requeue = outcome.reject
        return types.TaskError_Reject(types.Rejection(reason=reason, requeue=requeue))
    return types.TaskError_InvalidArguments(outcome.invalid_arguments or "")


class Plugin(exports.Plugin):
    """The WIT `plugin` export."""

    def describe(self) -> list[types.TaskInfo]:
        return [
            types.TaskInfo(
                name=t.name,
                doc=t.doc,
                params=list(t.params),
                limits=types.Limits(**t.limits),
                policy=types.TaskPolicy(**t.policy),
                ignore_result=t.ignore_result,
            )
            for t in REGISTRY.values()
        ]

    def run(self, invocation: types.Invocation, args_json: str, kwargs_json: str) -> str:
        task = REGISTRY.get(invocation.task)
        if task is None:
            raise Err(
                types.TaskError_Failed(
                    types.Failure(
                        kind="NotRegistered",
                        message=f"this plugin has no task named {invocation.task}",
                        args_json=None,
                    )
                )
            )
        outcome = task.run(_HOST, _request(invocation), args_json, kwargs_json)
        if outcome.result is not None:
            return outcome.result
        raise Err(_error(outcome))
