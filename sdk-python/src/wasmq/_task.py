"""`@task`: a plain function becomes a wasmq task, with Celery's task attributes; and the
plugin's task table, from which the entry point (`_guest.py`) answers `describe` and `run`.

Everything here is plain Python, so a plugin's tasks and this module are unit-tested with
CPython outside any sandbox (`sdk-python/tests`). `run` returns an `Outcome` — a result, or
one of the WIT `task-error` cases — that the entry point turns into the WIT types.
"""

from __future__ import annotations

import contextvars
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ._context import Context, Host
from ._errors import Reject, Retry, autoretry_kinds, failure_parts, retry_fields
from ._units import check_rate, seconds_to_ms, size_to_bytes

#: The tasks of this plugin, by name, in the order they were declared.
REGISTRY: dict[str, "Task"] = {}

_CURRENT: contextvars.ContextVar[Optional[Context]] = contextvars.ContextVar("wasmq_current", default=None)

#: The parameter name the SDK fills with the call's `Context`.
CTX_PARAM = "ctx"


def current() -> Context:
    """The context of the call being served (the same object a ``ctx`` parameter receives).

    Raises `RuntimeError` outside a task call.
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("wasmq.current() is only available while a task runs")
    return ctx


@dataclass
class Outcome:
    """How one call ended: exactly one of the fields is set."""

    #: The result as JSON text.
    result: Optional[str] = None
    #: (kind, message, args-json): the WIT `failed`.
    failed: Optional[tuple] = None
    #: The fields of the WIT `retry-request` (see `_errors.retry_fields`).
    retry: Optional[dict] = None
    #: (reason, requeue): the WIT `reject`.
    reject: Optional[tuple] = None
    #: The message of the WIT `invalid-arguments` (a `TypeError` for the sender).
    invalid_arguments: Optional[str] = None


@dataclass
class Task:
    """A declared task: the function and what `describe` reports about it."""

    fn: Callable[..., Any]
    name: str
    doc: str
    #: The parameters as Python writes a signature (`*args`, `**kwargs`), without ``ctx``.
    params: list[str]
    #: The WIT `limits` fields.
    limits: dict = field(default_factory=dict)
    #: The WIT `task-policy` fields.
    policy: dict = field(default_factory=dict)
    ignore_result: bool = False
    #: True when the function's first parameter is ``ctx``.
    takes_ctx: bool = False
    #: The signature callers bind against (``ctx`` removed).
    signature: inspect.Signature = None  # type: ignore[assignment]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the function directly (as Celery's ``task(...)`` runs it in process), with a
        context for a local call when it takes ``ctx``."""
        if self.takes_ctx:
            return self.fn(Context(Host(), task=self.name, id="local"), *args, **kwargs)
        return self.fn(*args, **kwargs)

    def run(self, host: Host, request: dict, args_json: str, kwargs_json: str) -> Outcome:
        """Binds the JSON arguments like a Python call, calls the function, and classifies how
        it ended."""
        bound = self._bind(args_json, kwargs_json)
        if isinstance(bound, Outcome):
            return bound
        args, kwargs = bound
        ctx = Context(host, **request)
        token = _CURRENT.set(ctx)
        try:
            value = self.fn(ctx, *args, **kwargs) if self.takes_ctx else self.fn(*args, **kwargs)
        except Retry as retry:
            try:
                return Outcome(retry=self._complete_retry(retry_fields(retry), args, kwargs))
            except (TypeError, ValueError) as e:
                return Outcome(failed=failure_parts(e))
        except Reject as reject:
            return Outcome(reject=(reject.reason, reject.requeue))
        except BaseException as e:  # noqa: BLE001 - every Python exception is a task failure
            return Outcome(failed=failure_parts(e))
        finally:
            _CURRENT.reset(token)
        try:
            return Outcome(result=json.dumps(value))
        except (TypeError, ValueError) as e:
            return Outcome(
                failed=(
                    "kombu.exceptions.EncodeError",
                    f"{self.name}: the result is not JSON-serialisable "
                    f"({type(value).__name__}): {e}",
                    None,
                )
            )

    def _complete_retry(self, fields: dict, args: list, kwargs: dict) -> dict:
        """Fills in the half of a retry's new arguments it did not give, as Celery does: new
        ``args`` alone keep this attempt's keywords except those the new positional arguments
        now fill; new ``kwargs`` alone replace this attempt's keywords, a keyword naming a
        parameter given positionally replacing that argument."""
        if (fields["args_json"] is None) == (fields["kwargs_json"] is None):
            return fields
        params = list(self.signature.parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_args = any(p.kind is p.VAR_POSITIONAL for p in params)
        if fields["args_json"] is not None:
            new_args = json.loads(fields["args_json"])
            kept = {k: v for k, v in kwargs.items() if k not in positional[: len(new_args)]}
            fields["kwargs_json"] = json.dumps(kept)
        else:
            new_kwargs = json.loads(fields["kwargs_json"])
            new_args = list(args)
            if len(new_args) <= len(positional) or var_args:
                for i, name in enumerate(positional[: len(new_args)]):
                    if name in new_kwargs:
                        new_args[i] = new_kwargs.pop(name)
            fields["args_json"] = json.dumps(new_args)
            fields["kwargs_json"] = json.dumps(new_kwargs)
        return fields

    def _bind(self, args_json: str, kwargs_json: str):
        try:
            args = json.loads(args_json) if args_json.strip() else []
            kwargs = json.loads(kwargs_json) if kwargs_json.strip() else {}
        except ValueError as e:
            return Outcome(invalid_arguments=f"{self.name}: the arguments are not JSON: {e}")
        if not isinstance(args, list):
            return Outcome(invalid_arguments=f"{self.name}: args must be a JSON array")
        if not isinstance(kwargs, dict):
            return Outcome(invalid_arguments=f"{self.name}: kwargs must be a JSON object")
        if self.takes_ctx and CTX_PARAM in kwargs:
            return Outcome(
                invalid_arguments=f"{self.name}() got an unexpected keyword argument '{CTX_PARAM}'"
            )
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as e:
            return Outcome(invalid_arguments=f"{self.name}({', '.join(self.params)}): {e}")
        return args, kwargs


def _params(signature: inspect.Signature) -> list[str]:
    """A signature's parameters as Python writes them, with ``*`` before keyword-only ones
    when there is no ``*args``."""
    out: list[str] = []
    star = False
    for p in signature.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                out.append("*")
                star = True
            out.append(p.name)
    return out


def _declare(fn: Callable[..., Any], options: dict) -> Task:
    if not callable(fn) or inspect.isclass(fn):
        raise TypeError(f"@task decorates a function, not {fn!r}")
    if inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError(f"@task: {fn.__qualname__} must be a plain function (not async, not a generator)")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"@task: unknown option(s) {sorted(unknown)}; expected some of {sorted(_OPTIONS)}")
    signature = inspect.signature(fn)
    parameters = list(signature.parameters.values())
    takes_ctx = bool(parameters) and parameters[0].name == CTX_PARAM
    if takes_ctx:
        if parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
            raise TypeError(f"@task: {fn.__qualname__}: `ctx` must be the first positional parameter")
        signature = signature.replace(parameters=parameters[1:])
    name = options.get("name") or f"{fn.__module__}.{fn.__name__}"
    if name in REGISTRY and REGISTRY[name].fn is not fn:
        raise ValueError(f"@task: two tasks are named {name!r}")

    timeout = _first(options, "timeout", "time_limit")
    soft = _first(options, "soft_timeout", "soft_time_limit")
    limits = {
        "fuel": options.get("fuel"),
        "memory_bytes": size_to_bytes(options.get("memory"), "memory"),
        "timeout_ms": seconds_to_ms(timeout, "timeout"),
        "soft_timeout_ms": seconds_to_ms(soft, "soft_timeout"),
    }
    if limits["fuel"] is not None and (not isinstance(limits["fuel"], int) or limits["fuel"] <= 0):
        raise ValueError(f"@task: fuel must be a positive integer, got {limits['fuel']!r}")
    if limits["timeout_ms"] is not None and (limits["soft_timeout_ms"] or 0) > limits["timeout_ms"]:
        raise ValueError(f"@task: {name}: soft_timeout is above timeout, as Celery refuses it")
    backoff = options.get("retry_backoff")
    if backoff is True:
        backoff = 1
    elif backoff is False:
        backoff = None
    max_retries = options.get("max_retries")
    if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
        raise ValueError(f"@task: max_retries must be a non-negative integer, got {max_retries!r}")
    policy = {
        "autoretry_for": autoretry_kinds(options.get("autoretry_for")),
        "max_retries": max_retries,
        "default_retry_delay_ms": seconds_to_ms(options.get("default_retry_delay"), "default_retry_delay"),
        "retry_backoff_ms": seconds_to_ms(backoff, "retry_backoff"),
        "retry_backoff_max_ms": seconds_to_ms(options.get("retry_backoff_max"), "retry_backoff_max"),
        "retry_jitter": options.get("retry_jitter"),
        "rate_limit": check_rate(options.get("rate_limit")),
    }
    task = Task(
        fn=fn,
        name=name,
        doc=inspect.getdoc(fn) or "",
        params=_params(signature),
        limits=limits,
        policy=policy,
        ignore_result=bool(options.get("ignore_result", False)),
        takes_ctx=takes_ctx,
        signature=signature,
    )
    REGISTRY[name] = task
    return task


_OPTIONS = {
    "name",
    "timeout",
    "time_limit",
    "soft_timeout",
    "soft_time_limit",
    "fuel",
    "memory",
    "autoretry_for",
    "max_retries",
    "default_retry_delay",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
    "rate_limit",
    "ignore_result",
}


def _first(options: dict, *names: str) -> Any:
    given = [n for n in names if options.get(n) is not None]
    if len(given) > 1:
        raise TypeError(f"@task: {' and '.join(given)} are one limit; give one of them")
    return options.get(given[0]) if given else None


def task(fn: Optional[Callable[..., Any]] = None, **options: Any):
    """Declares a task. Bare (``@task``) or with Celery's task attributes::

        @task(name="proj.tasks.div", timeout=2, soft_timeout="1500ms", fuel=10**9,
              memory="64MiB", autoretry_for=(ConnectionError,), max_retries=3,
              default_retry_delay=5, retry_backoff=True, rate_limit="10/s",
              ignore_result=False)
        def div(ctx, a, b): ...

    The default name is ``<module>.<function>``, as Celery names tasks. Returns a `Task`,
    which is still callable as the plain function.
    """
    if fn is not None:
        if options:
            raise TypeError("@task takes options as keywords: @task(name=...)")
        return _declare(fn, {})

    def decorator(f: Callable[..., Any]) -> Task:
        return _declare(f, options)

    return decorator
