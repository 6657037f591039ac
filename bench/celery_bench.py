"""The Python Celery side of `wasmq bench amqp`.

    python celery_bench.py roundtrip N   -> {"p50": ms, "p95": ms, "p99": ms}
    python celery_bench.py publish N     -> {"rate": messages per second}

BROKER, BACKEND and QUEUE come from the environment; the Celery app is tests/python/tasks.py
(on PYTHONPATH).
"""

import json
import os
import sys
import time

from tasks import add, app

queue = os.environ["QUEUE"]


def percentile(sorted_values, p):
    rank = round(p / 100 * (len(sorted_values) - 1))
    return sorted_values[rank]


def roundtrip(n):
    add.apply_async((0, 0), queue=queue).get(timeout=30)  # warm up connections
    samples = []
    for i in range(n):
        started = time.perf_counter()
        assert add.apply_async((i, 1), queue=queue).get(timeout=30) == i + 1
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {"p50": percentile(samples, 50), "p95": percentile(samples, 95), "p99": percentile(samples, 99)}


def publish(n):
    add.apply_async((0, 0), queue=queue, ignore_result=True)
    started = time.perf_counter()
    for i in range(n):
        add.apply_async((i, i), queue=queue, ignore_result=True)
    return {"rate": n / (time.perf_counter() - started)}


if __name__ == "__main__":
    command, count = sys.argv[1], int(sys.argv[2])
    result = {"roundtrip": roundtrip, "publish": publish}[command](count)
    app.close()
    json.dump(result, sys.stdout)
