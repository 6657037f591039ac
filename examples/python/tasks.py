"""An example wasmq plugin in Python: Celery-style tasks, each call run in a fresh
WebAssembly sandbox. Build it with

    wasmq plugins build examples/python/tasks.py -o plugins/tasks.wasm

(requirements.txt beside it is installed into the plugin), serve it with a worker, and call
`tasks.add` from a Celery client as usual.
"""

import os
import socket

from slugify import slugify

from wasmq import Reject, Retry, current, task


class QuotaError(Exception):
    """A failure of this module's own: clients see `tasks.QuotaError`."""


@task
def add(a, b):
    """Adds two numbers."""
    return a + b


@task(name="tasks.greet")
def greet(name, *, greeting="Hello", punctuation="!"):
    """Greets someone; the keyword-only options are passed as Celery kwargs."""
    return f"{greeting}, {name}{punctuation}"


@task(timeout=5)
def div(a, b):
    """Divides: a zero divisor raises ZeroDivisionError, as in Python."""
    return a / b


@task
def spend(amount, *, quota=100):
    """Fails with an exception class of this module beyond the quota."""
    if amount > quota:
        raise QuotaError(amount, quota)
    return quota - amount


@task(max_retries=5, default_retry_delay=1)
def flaky(ctx, succeed_on=2):
    """Asks to be retried (after 50 ms) until it has been retried `succeed_on` times."""
    if ctx.retries < succeed_on:
        raise Retry(countdown=0.05, exc=ConnectionError(f"attempt {ctx.retries} failed"))
    return {"retries": ctx.retries, "id": ctx.id}


@task
def refuse(reason="not for me"):
    """Refuses its message: it is dead-lettered and the result is a Reject failure."""
    raise Reject(reason, requeue=False)


@task
def progress(ctx, steps=3):
    """Logs and reports a custom state at each step."""
    for done in range(1, steps + 1):
        ctx.log("info", f"step {done} of {steps}")
        ctx.update_state("PROGRESS", {"done": done, "total": steps})
    return steps


@task
def request():
    """What the task knows about its call, reached with wasmq.current()."""
    ctx = current()
    return {
        "id": ctx.id,
        "task": ctx.task,
        "retries": ctx.retries,
        "headers": ctx.headers,
        "soft_time_left": ctx.soft_time_left(),
        "should_stop": ctx.should_stop(),
    }


@task
def slug(text):
    """Uses a pure-Python dependency from PyPI (python-slugify, with text-unidecode)."""
    return slugify(text)


@task
def bad_result():
    """Returns something JSON cannot encode: a clear failure, not a crash."""
    return {1, 2, 3}


# Hostile attempts: each must fail cleanly with a precise reason, and the worker carries on.


@task
def read_file(path="/etc/passwd"):
    """Tries to read a host file."""
    with open(path) as f:
        return f.read()


@task
def read_env(name="HOME"):
    """Tries to read the worker's environment."""
    return os.environ[name]


@task
def connect(host="127.0.0.1", port=5672):
    """Tries to open a TCP connection (to an address: no name lookup needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        conn.settimeout(1)
        conn.connect((host, port))
        return str(conn.getpeername())


@task
def resolve(name="example.com"):
    """Tries to look up a host name."""
    return socket.getaddrinfo(name, 80)[0][4][0]


@task(timeout=1)
def spin():
    """Loops forever: stopped by the time limit."""
    n = 0
    while True:
        n += 1
