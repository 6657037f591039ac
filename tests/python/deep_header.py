"""Publishes math.add(20, 22) as Celery's protocol 2 with one more header, ``deep``, nested
DEPTH lists deep, to QUEUE on the RabbitMQ at BROKER, with task id ID (tests/all/bad_input.rs).

py-amqp encodes nested values recursively, so the work runs on a thread with a large stack
and a raised recursion limit."""

import json
import os
import sys
import threading

import amqp


def publish():
    depth, queue, task_id = int(os.environ["DEPTH"]), os.environ["QUEUE"], os.environ["ID"]
    deep = 1
    for _ in range(depth):
        deep = [deep]
    connection = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    connection.connect()
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False)
    headers = {
        "lang": "py", "task": "math.add", "id": task_id, "root_id": task_id,
        "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
        "timelimit": [None, None], "deep": deep,
    }
    body = json.dumps([[20, 22], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = amqp.Message(
        body, content_type="application/json", content_encoding="utf-8",
        application_headers=headers, delivery_mode=2, correlation_id=task_id,
    )
    channel.basic_publish(message, routing_key=queue)
    connection.close()
    print(json.dumps({"published": task_id}))


sys.setrecursionlimit(1_000_000)
threading.stack_size(512 * 1024 * 1024)
thread = threading.Thread(target=publish)
thread.start()
thread.join()
