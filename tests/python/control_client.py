"""An unmodified Python Celery client (and the `celery` CLI) remote-controlling a wasmq worker.

`inspect()` and `control` publish Celery's pidbox commands on `celery.pidbox` and collect the
replies on `reply.celery.pidbox`. Reads BROKER, BACKEND, QUEUE and NODE (the worker's node
name) from the environment and prints one JSON object describing what the client saw. The
worker runs with one task slot, so while `math.sleep` runs every slot is busy.
"""

import json
import os
import subprocess
import sys
import time
import uuid

from celery import Celery
from celery.canvas import StampingVisitor

app = Celery("control-client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
queue = os.environ["QUEUE"]
node = os.environ["NODE"]
inspect = app.control.inspect(destination=[node], timeout=5)
report = {}


def outcome(result, timeout=30):
    try:
        return {"ok": result.get(timeout=timeout)}
    except Exception as error:  # noqa: BLE001 - we report what Celery raised
        return {"error": type(error).__name__, "message": str(error), "state": result.state}


def mine(replies):
    """This worker's reply, out of the replies of every node (None when it did not reply)."""
    return (replies or {}).get(node)


report["ping"] = mine(inspect.ping())
report["registered"] = mine(inspect.registered())
report["active_queues"] = [q["name"] for q in mine(inspect.active_queues()) or []]
replies = app.control.broadcast("no_such_command", destination=[node], reply=True, timeout=5)
report["unknown"] = mine({k: v for r in replies for k, v in r.items()})

# Every slot busy: ping still answers at once, and `active` lists the running task.
sleeping = app.send_task("math.sleep", (3,), queue=queue)
time.sleep(1.0)
started = time.monotonic()
report["ping_busy"] = mine(inspect.ping())
report["ping_busy_s"] = time.monotonic() - started
active = mine(inspect.active()) or []
report["active"] = [{"id": t["id"], "name": t["name"], "args": t["args"]} for t in active]
report["sleeping_id"] = sleeping.id
report["sleeping"] = outcome(sleeping)

stats = mine(inspect.stats()) or {}
report["stats"] = {
    "max_concurrency": stats.get("pool", {}).get("max-concurrency"),
    "processes": len(stats.get("pool", {}).get("processes", [])),
    "sleep_total": stats.get("total", {}).get("math.sleep"),
    "broker": stats.get("broker"),
    "has_prefetch": isinstance(stats.get("prefetch_count"), int),
}

# The CLI a liveness probe runs: exit 0 and "pong".
cli = subprocess.run(
    [sys.executable, "-m", "celery", "-b", os.environ["BROKER"], "inspect", "ping",
     "-d", node, "-t", "5"],
    capture_output=True, text=True, timeout=60,
)
report["cli_ping"] = {"code": cli.returncode, "pong": "pong" in cli.stdout}

# revoke with a reply: an id nobody has started is stored REVOKED at once; a task another
# worker started keeps its state.
started_elsewhere, unseen = str(uuid.uuid4()), str(uuid.uuid4())
app.backend.store_result(started_elsewhere, {"hostname": "other@host"}, "STARTED")
replies = app.control.revoke([unseen, started_elsewhere], reply=True, timeout=5, destination=[node])
report["revoke_reply"] = mine({k: v for r in replies for k, v in r.items()})
report["unseen_state"] = app.backend.get_state(unseen)
report["started_elsewhere_state"] = app.backend.get_state(started_elsewhere)
report["revoked_listed"] = unseen in (mine(inspect.revoked()) or [])

# revoke_by_stamped_headers: a task stamped with a revoked value is not run; others are.
monitoring_id = uuid.uuid4().hex


class Stamp(StampingVisitor):
    def on_signature(self, sig, **headers):
        return {"monitoring_id": monitoring_id}


replies = app.control.revoke_by_stamped_headers(
    {"monitoring_id": [monitoring_id]}, reply=True, timeout=5, destination=[node])
report["stamp_reply"] = mine({k: v for r in replies for k, v in r.items()})
stamped = app.signature("math.add", (1, 1), queue=queue)
stamped.stamp(visitor=Stamp())
report["stamped"] = outcome(stamped.apply_async())
report["unstamped"] = outcome(app.send_task("math.add", (2, 2), queue=queue))

# Last: `celery control shutdown` stops the worker gracefully (Celery sends no reply).
app.control.shutdown(destination=[node])
json.dump(report, sys.stdout)
