"""wasmq's Python SDK: write wasmq tasks as plain Python functions.

A plugin is a module of decorated functions::

    from wasmq import task, Retry, Reject

    @task
    def add(a, b):
        return a + b

    @task(name="proj.tasks.fetch", timeout=10, autoretry_for=(ConnectionError,), max_retries=3)
    def fetch(ctx, url):
        ctx.log("info", f"task {ctx.id} fetching {url}")
        ...

`wasmq plugins build tasks.py` turns it into a WebAssembly component a wasmq worker serves;
Celery clients call its tasks by name. Every call runs in a fresh sandbox.
"""

from ._context import Context
from ._errors import Reject, Retry, exception_kind
from ._task import REGISTRY, Task, current, task

__all__ = ["task", "Task", "Retry", "Reject", "Context", "current", "exception_kind", "REGISTRY"]
__version__ = "0.3.0"
#: The WIT contract the SDK implements (`wit/task.wit`).
CONTRACT = "wasmq:task@0.3.0"
