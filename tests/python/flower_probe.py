"""Flower (unmodified, from PyPI) watching a wasmq worker, driven as a user would.

Reads FLOWER (Flower's base URL), BROKER, BACKEND, QUEUE and NODE (the worker's node name)
from the environment. MODE=watch (default): waits until Flower lists NODE as online, then
sends `math.add(2, 3)` and `math.div(1, 0)` until Flower shows both tasks, with their
state and runtime, from NODE's task events (the worker starts without task events: Flower
switches them on with its `enable_events` broadcast), then asks Flower to inspect the
worker. MODE=offline: waits until Flower lists NODE as offline. Prints one JSON object.
"""

import json
import os
import time
import urllib.request

from celery import Celery

flower = os.environ["FLOWER"].rstrip("/")
node = os.environ["NODE"]
mode = os.environ.get("MODE", "watch")
report = {}


def get(path):
    with urllib.request.urlopen(flower + path, timeout=10) as response:
        return json.loads(response.read().decode())


def online():
    try:
        return get("/api/workers?status=1").get(node)
    except OSError:
        return None


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    return None


if mode == "offline":
    started = time.monotonic()
    report["offline"] = wait_for(lambda: online() is False, 10) is not None
    report["offline_after_s"] = time.monotonic() - started
    print(json.dumps(report))
    raise SystemExit(0)

app = Celery("flower-probe", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
queue = os.environ["QUEUE"]

started = time.monotonic()
report["online"] = wait_for(lambda: online() is True, 30) is not None
report["online_after_s"] = time.monotonic() - started

sent = []


def tasks_seen():
    """Sends a pair of tasks, then looks for a finished pair from NODE in Flower's tasks."""
    add = app.send_task("math.add", (2, 3), queue=queue)
    div = app.send_task("math.div", (1, 0), queue=queue)
    sent.extend([add.id, div.id])
    time.sleep(0.5)
    tasks = get("/api/tasks")
    mine = [t for t in tasks.values() if t.get("worker") == node]
    ok = [t for t in mine if t.get("name") == "math.add" and t.get("state") == "SUCCESS"]
    failed = [t for t in mine if t.get("name") == "math.div" and t.get("state") == "FAILURE"]
    if ok and failed:
        return {"succeeded": ok[-1], "failed": failed[-1]}
    return None


seen = wait_for(tasks_seen, 40)
if seen:
    keep = ("name", "state", "runtime", "result", "exception", "worker", "args", "received", "started", "routing_key")
    report["succeeded"] = {k: seen["succeeded"].get(k) for k in keep}
    report["failed"] = {k: seen["failed"].get(k) for k in keep}
report["sent"] = len(sent)

workers = get("/api/workers?refresh=1&workername=" + urllib.request.quote(node))
info = workers.get(node, {})
report["inspected"] = sorted(info.keys())
report["registered_add"] = "math.add" in (info.get("registered") or [])
report["stats_pool"] = (info.get("stats") or {}).get("pool", {}).get("max-concurrency")
with urllib.request.urlopen(flower + "/worker/" + urllib.request.quote(node), timeout=10) as page:
    report["worker_page"] = page.status
print(json.dumps(report))
