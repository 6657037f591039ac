"""An unmodified Python Celery client with quorum queues, sending a countdown that Celery
routes through native delayed delivery (`celery_delayed_27`) to a queue a wasmq worker serves.

Reads BROKER, BACKEND and QUEUE from the environment. `declare` declares the work queue the
way this client's worker side would (quorum, topic exchange); `send` sends math.add(20, 22)
with a 2 s countdown and prints the result, the exchange Celery published to, and how long
after the eta the task finished (from the result's date_done).
"""

import json
import os
import sys
from datetime import datetime

from celery import Celery
from celery.signals import before_task_publish

app = Celery("delayed-client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
queue = os.environ["QUEUE"]
app.conf.task_default_queue = queue
app.conf.task_default_queue_type = "quorum"
app.conf.task_default_exchange_type = "topic"

published = {}


@before_task_publish.connect
def remember(headers=None, exchange=None, routing_key=None, **_):
    published["exchange"] = getattr(exchange, "name", exchange)
    published["routing_key"] = routing_key
    published["eta"] = headers.get("eta") if headers else None


if sys.argv[1] == "declare":
    with app.connection_for_write() as connection:
        app.amqp.queues[queue].bind(connection.default_channel).declare()
    json.dump({"declared": True}, sys.stdout)
else:
    result = app.send_task("math.add", args=(20, 22), countdown=2)
    value = result.get(timeout=30)
    eta = datetime.fromisoformat(published["eta"])
    done = result.date_done
    if done.tzinfo is None:
        done = done.replace(tzinfo=eta.tzinfo)
    json.dump(
        {
            "result": value,
            "exchange": published["exchange"],
            "routing_key": published["routing_key"],
            "lateness_ms": (done - eta).total_seconds() * 1000,
        },
        sys.stdout,
    )
