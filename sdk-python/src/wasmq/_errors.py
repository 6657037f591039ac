"""How a task ends other than with a result: Celery's exceptions, and the translation of any
Python exception into the failure a Celery client sees (`exc_module`, `exc_type`,
`exc_message`, and the exception's arguments).
"""

from __future__ import annotations

import builtins
import json
from typing import Any, Optional

from ._units import seconds_to_ms


class Retry(Exception):
    """Raised by a task to run again later with the same id and `retries + 1` (Celery's
    `raise self.retry(...)`).

    ``countdown`` is the delay in seconds (absent: the task's ``default_retry_delay``);
    ``exc`` the exception the task ends with once its retries are spent (absent:
    ``MaxRetriesExceededError``); ``args``/``kwargs`` the next attempt's arguments (absent:
    this attempt's); ``max_retries`` how many retries this call allows (absent: the task's);
    ``expires`` seconds after which the next attempt is revoked if it has not started.
    """

    def __init__(
        self,
        message: Optional[str] = None,
        *,
        countdown: Optional[float] = None,
        exc: Optional[BaseException] = None,
        max_retries: Optional[int] = None,
        args: Optional[list] = None,
        kwargs: Optional[dict] = None,
        expires: Optional[float] = None,
    ) -> None:
        self.message = message
        self.countdown = countdown
        self.exc = exc
        self.max_retries = max_retries
        self.retry_args = None if args is None else list(args)
        self.retry_kwargs = None if kwargs is None else dict(kwargs)
        self.expires = expires
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        """Why the task is retried, as shown in the RETRY state."""
        if self.message:
            return self.message
        if self.exc is not None:
            return f"{type(self.exc).__name__}: {self.exc}"
        if self.countdown is not None:
            return f"Retry in {self.countdown}s"
        return "Retry requested"


class Reject(Exception):
    """Raised by a task to refuse its message (Celery's `Reject(reason, requeue)`).

    ``requeue=False``: the message is dead-lettered and the result is a `Reject` failure.
    ``requeue=True``: nothing is stored, the message goes back to its queue and is delivered
    again (with ``ctx.redelivered`` set); the worker's poison protection counts those
    deliveries.
    """

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = "" if reason is None else str(reason)
        self.requeue = bool(requeue)
        super().__init__(self.reason, self.requeue)


class ResultNotSerializable(Exception):
    """Internal: the task returned a value `json.dumps` cannot encode."""


def exception_kind(cls: type) -> str:
    """The failure kind of an exception class as Celery names it: a builtin alone
    (`ZeroDivisionError`), anything else by its dotted path (`proj.tasks.QuotaError`), so a
    Python client that imports that module raises that very class."""
    module = getattr(cls, "__module__", None) or "builtins"
    if module == "builtins" and getattr(builtins, cls.__name__, None) is cls:
        return cls.__name__
    return f"{module}.{cls.__qualname__}"


def failure_parts(exc: BaseException) -> tuple[str, str, Optional[str]]:
    """(kind, message, args-json) of an exception. The arguments are given when they are not
    just ``[message]``; arguments JSON cannot encode are passed as their ``repr``; an
    `OSError`'s file names are added to its arguments."""
    kind = exception_kind(type(exc))
    message = str(exc)
    args = list(getattr(exc, "args", ()) or ())
    if isinstance(exc, OSError) and exc.filename is not None and len(args) == 2:
        # The path is an attribute, not an argument: pass it on, so the client's rebuilt
        # exception still says which file (`OSError(errno, strerror, filename)`).
        args.append(exc.filename)
        if exc.filename2 is not None:
            args += [None, exc.filename2]
    if args == [message] or (not args and not message):
        return kind, message, None
    try:
        args_json = json.dumps(args)
    except (TypeError, ValueError):
        args_json = json.dumps([a if _is_json(a) else repr(a) for a in args])
    return kind, message, args_json


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def autoretry_kinds(classes: Any) -> list[str]:
    """The failure kinds the worker retries automatically for Celery's ``autoretry_for``.

    The worker matches kinds by name, while Celery matches with ``isinstance``: so each class
    is listed with every subclass defined when the plugin was built. ``Exception`` (or
    ``BaseException``) is ``*``, every kind. Names given as strings are taken as they are.
    """
    if classes is None:
        return []
    if isinstance(classes, (str, type)):
        classes = (classes,)
    kinds: list[str] = []

    def add(kind: str) -> None:
        if kind not in kinds:
            kinds.append(kind)

    for entry in classes:
        if isinstance(entry, str):
            add(entry)
            continue
        if not (isinstance(entry, type) and issubclass(entry, BaseException)):
            raise TypeError(f"autoretry_for: {entry!r} is not an exception class")
        if entry in (Exception, BaseException):
            return ["*"]
        stack = [entry]
        while stack:
            cls = stack.pop(0)
            add(exception_kind(cls))
            stack.extend(cls.__subclasses__())
    return kinds


def retry_fields(retry: Retry) -> dict:
    """The fields of the WIT `retry-request` a `Retry` asks for (failure as a tuple)."""
    return {
        "countdown_ms": seconds_to_ms(retry.countdown, "Retry(countdown=...)"),
        "reason": retry.reason,
        "exc": None if retry.exc is None else failure_parts(retry.exc),
        "args_json": None if retry.retry_args is None else json.dumps(retry.retry_args),
        "kwargs_json": None if retry.retry_kwargs is None else json.dumps(retry.retry_kwargs),
        "max_retries": retry.max_retries,
        "expires_ms": seconds_to_ms(retry.expires, "Retry(expires=...)"),
    }
