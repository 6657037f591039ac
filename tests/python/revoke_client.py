"""An unmodified Python Celery client revoking tasks served by wasmq workers.

`app.control.revoke` and `AsyncResult.revoke(terminate=True)` publish Celery's remote-control
command on `celery.pidbox`; wasmq workers listen there. Reads BROKER, BACKEND and QUEUE from
the environment and prints one JSON object describing what the client saw.
"""

import json
import os
import sys
import time
import uuid

from celery import Celery

app = Celery("revoke-client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
queue = os.environ["QUEUE"]


def outcome(result):
    try:
        return {"ok": result.get(timeout=30)}
    except Exception as error:  # noqa: BLE001 - we report what Celery raised
        return {"error": type(error).__name__, "message": str(error), "state": result.state}


report = {}

# Revoked before it is sent: the worker refuses it.
task_id = str(uuid.uuid4())
app.control.revoke(task_id)
time.sleep(1.0)
report["revoked"] = outcome(app.send_task("math.add", (1, 2), task_id=task_id, queue=queue))

# Revoked with terminate while it runs: interrupted at once.
running = app.send_task("math.sleep", (20,), queue=queue)


def is_running(task_id):
    replies = app.control.inspect(timeout=1.0).active() or {}
    return any(task.get("id") == task_id for tasks in replies.values() for task in tasks)


# Wait until a worker reports it running (a loaded machine can take more than a second).
waiting_since = time.monotonic()
deadline = waiting_since + 20
seen_running = is_running(running.id)
while not seen_running and time.monotonic() < deadline:
    time.sleep(0.2)
    seen_running = is_running(running.id)
# For the test's failure message: a task revoked before it ran is "revoked", not "terminated".
report["seen_running"] = seen_running
report["waited_for_running_s"] = time.monotonic() - waiting_since
started = time.monotonic()
running.revoke(terminate=True)
report["terminated"] = outcome(running)
report["terminated_after_s"] = time.monotonic() - started

# The worker carries on.
report["after"] = outcome(app.send_task("math.add", (2, 2), queue=queue))
json.dump(report, sys.stdout)
