"""An unmodified Python Celery client (and the `celery` CLI) remote-controlling a wasmq worker.

`inspect()` and `control` publish Celery's pidbox commands on `celery.pidbox` and collect the
replies on `reply.celery.pidbox`. Reads BROKER, BACKEND, QUEUE, QUEUE2 (a second queue the
worker does not consume at first) and NODE (the worker's node name) from the environment and
prints one JSON object describing what the client saw. The worker runs with one task slot, so
while `math.sleep` runs every slot is busy.
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


def celery_cli(*args):
    """`celery -b BROKER <args> -d NODE -t 5`: (exit code, stdout)."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-b", os.environ["BROKER"], *args, "-d", node, "-t", "5"],
        capture_output=True, text=True, timeout=60,
    )
    return done.returncode, done.stdout


def celery_json(*args):
    """`celery -b BROKER <args> --json`: this worker's reply."""
    code, out = celery_cli(*args, "--json")
    return mine(json.loads(out)) if code == 0 else {"code": code, "out": out}


# The CLI with --json, as dashboards and probes script it.
report["cli_ping_json"] = celery_json("inspect", "ping")
report["cli_registered"] = "math.add" in (celery_json("inspect", "registered") or [])
cli_stats = celery_json("inspect", "stats") or {}
report["cli_stats"] = {
    "max_concurrency": cli_stats.get("pool", {}).get("max-concurrency"),
    "has_broker": isinstance(cli_stats.get("broker"), dict),
    "has_total": isinstance(cli_stats.get("total"), dict),
    "maxrss": (cli_stats.get("rusage") or {}).get("maxrss"),
    "consuming": cli_stats.get("wasmq", {}).get("consuming"),
}
# Long enough to outlast a slow `celery` CLI start on a loaded machine.
sleeping = app.send_task("math.sleep", (5,), queue=queue)
time.sleep(0.8)
report["cli_active"] = [t["id"] for t in celery_json("inspect", "active") or []]
report["cli_active_expected"] = sleeping.id
outcome(sleeping)

# A near eta is held in memory: `scheduled` and `reserved` list it, `query_task` finds it.
held = app.send_task("math.add", (1, 1), queue=queue, countdown=0.95)
time.sleep(0.2)
report["scheduled"] = [(s["request"]["id"], "eta" in s) for s in mine(inspect.scheduled()) or []]
report["reserved"] = [r["id"] for r in mine(inspect.reserved()) or []]
report["query_task"] = (mine(inspect.query_task([held.id])) or {}).get(held.id, [None])[0]
report["held_id"] = held.id
report["held"] = outcome(held)

# rate_limit: 6 tasks at 2/s take at least 2.5 s; then the limit is disabled again.
code, out = celery_cli("control", "rate_limit", "math.add", "2/s")
report["rate_limit_reply"] = {"code": code, "ok": "new rate limit set successfully" in out}
report["registered_rate"] = [n for n in mine(inspect.registered()) or []
                            if n.split(" ")[0] == "math.add"]
started = time.monotonic()
results = [app.send_task("math.add", (i, i), queue=queue) for i in range(6)]
report["rate_limited"] = [outcome(r).get("ok") for r in results]
report["rate_limited_s"] = time.monotonic() - started
code, out = celery_cli("control", "rate_limit", "math.add", "0")
report["rate_limit_off"] = "rate limit disabled successfully" in out
report["rate_limit_unknown"] = mine({k: v for r in app.control.broadcast(
    "rate_limit", arguments={"task_name": "no.such", "rate_limit": "1/s"},
    destination=[node], reply=True, timeout=5) for k, v in r.items()})
report["rate_limit_bad"] = mine({k: v for r in app.control.broadcast(
    "rate_limit", arguments={"task_name": "math.add", "rate_limit": "fast"},
    destination=[node], reply=True, timeout=5) for k, v in r.items()})

# time_limit: the next math.sleep(3) is stopped at 1 s.
code, out = celery_cli("control", "time_limit", "math.sleep", "0.5", "1")
report["time_limit_reply"] = {"code": code, "ok": "time limits set successfully" in out}
started = time.monotonic()
report["time_limited"] = outcome(app.send_task("math.sleep", (3,), queue=queue))
report["time_limited_s"] = time.monotonic() - started

# add_consumer / cancel_consumer: a second queue is consumed, then no longer.
queue2 = os.environ["QUEUE2"]
code, out = celery_cli("control", "add_consumer", queue2)
report["add_consumer"] = {"code": code, "ok": f"add consumer {queue2}" in out}
report["queues_after_add"] = sorted(q["name"] for q in mine(inspect.active_queues()) or [])
report["on_queue2"] = outcome(app.send_task("math.add", (20, 22), queue=queue2))
code, out = celery_cli("control", "cancel_consumer", queue2)
report["cancel_consumer"] = {"code": code, "ok": f"no longer consuming from {queue2}" in out}
report["queues_after_cancel"] = [q["name"] for q in mine(inspect.active_queues()) or []]
not_consumed = app.send_task("math.add", (1, 2), queue=queue2)
time.sleep(3)
report["after_cancel_state"] = not_consumed.state

# Commands wasmq cannot honour get Celery's error replies, never a fake "ok".
for method, arguments in [("autoscale", {"max": 4, "min": 1}), ("memdump", {}),
                          ("pool_grow", {"n": 1})]:
    replies = app.control.broadcast(method, arguments=arguments, destination=[node],
                                    reply=True, timeout=5)
    report[f"{method}_reply"] = mine({k: v for r in replies for k, v in r.items()})

# Last: `celery control shutdown` stops the worker gracefully (Celery sends no reply).
app.control.shutdown(destination=[node])
json.dump(report, sys.stdout)
