"""An unmodified Python Celery client calling tasks served by a wasmq worker.

Reads BROKER, BACKEND and QUEUE from the environment, calls a fixed set of tasks and prints
one JSON object: for each call either {"ok": value} or the exception the client raised.
"""

import json
import os
import sys

import billiard.exceptions
from celery import Celery
from celery.exceptions import NotRegistered

# Celery rebuilds a task's exception as the class named by exc_module/exc_type when that
# module is imported: these are the classes the math plugin raises by name.
import wasmq_errors

app = Celery("client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
queue = os.environ["QUEUE"]


def call(name, args=(), kwargs=None, **options):
    result = app.send_task(name, args=args, kwargs=kwargs or {}, queue=queue, **options)
    try:
        return {"ok": result.get(timeout=30)}
    except Exception as error:  # noqa: BLE001 - we report what Celery raised
        return {
            "error": type(error).__name__,
            "message": str(error),
            "args": [a if isinstance(a, (int, float, str)) else repr(a) for a in error.args],
            "is_time_limit": isinstance(error, billiard.exceptions.TimeLimitExceeded),
            "is_memory_error": isinstance(error, MemoryError),
            "is_zero_division": isinstance(error, ZeroDivisionError),
            "is_not_registered": isinstance(error, NotRegistered),
            "is_out_of_range": isinstance(error, wasmq_errors.OutOfRange),
            "is_gave_up": isinstance(error, wasmq_errors.GaveUp),
        }


calls = {
    "add": call("math.add", (2, 3)),
    "kwargs": call("math.add", (), {"a": 2, "b": 40}),
    "div": call("math.div", (1, 0)),
    "spin": call("hostile.spin", (), time_limit=1),
    "hog": call("hostile.hog"),
    "unknown": call("math.nope", (1,)),
    "countdown": call("math.add", (20, 22), countdown=1),
    "text": call("text.slugify", ("Hello from Python",)),
    "custom": call("math.bounded", (7, 0, 5)),
    "gave_up": call("math.give_up"),
    # What a task can know and ask (issue 20, cause 8): Celery's request fields as this
    # client sets them, a retry with new arguments, Reject(requeue=True), *args, and a
    # message that asks for the result its task declares it ignores.
    "request": call(
        "math.debug_task",
        priority=7,
        headers={"x-demo": "yes"},
        app_id="python-client",
        time_limit=20,
        soft_time_limit=10,
        countdown=0.2,
    ),
    "collatz": call("math.collatz", (6,)),
    "second_chance": call("math.second_chance", (5,)),
    "total": call("math.total", (1, 2, 3.5)),
    "kept": call("math.add_quietly", (20, 22), ignore_result=False),
    # Celery's task_compression: a zlib body under kombu's `compression` header.
    "compressed": call("math.add", (40, 2), compression="zlib"),
}
json.dump(calls, sys.stdout)
