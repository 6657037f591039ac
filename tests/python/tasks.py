"""A small Python Celery app: the worker side of wasmq's interop tests.

wasmq's Rust client sends `tasks.add` and `tasks.fail` to a real Celery worker running
this module and reads the results through the rpc and Redis backends.
"""

import os

from celery import Celery

app = Celery("tasks", broker=os.environ["BROKER"], backend=os.environ.get("BACKEND") or None)
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True


@app.task(name="tasks.add")
def add(x, y):
    return x + y


@app.task(name="math.add")
def math_add(a, b):
    """The wasmq math plugin's `add`, so a Python and a wasmq worker can share one queue."""
    return a + b


@app.task(name="tasks.fail")
def fail():
    raise ValueError("bad input", 42)


def _fib(n):
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@app.task(name="tasks.fib")
def fib(n):
    """The same call-heavy recursion as the wasmq math.fib task (for benchmarks)."""
    return _fib(n)
