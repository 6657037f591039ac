"""The wasmq worker process that stands in for Celery's in-process session worker.

Celery's suite runs its tasks on ``celery_session_worker``, a worker started inside the
pytest process (``celery.contrib.testing.worker.start_worker``: one prefork child,
``concurrency=1``). Here a ``wasmq worker`` process takes its place: the ``celery`` queue,
one task at a time as there, and wasmq's defaults otherwise (its retry defaults are
Celery's: 3 retries, 3 minutes). It serves the plugin in ``--plugins`` (the port of the
suite's pure tasks) on the run's private vhost and Redis database.

Its stdout and stderr go to a log file; :meth:`WasmqWorker.log_since` gives the lines a
test caused, which the plugin attaches to that test's failure report.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from kombu import Connection

#: How long the worker may take to start consuming (the first start compiles the plugin).
START_TIMEOUT_SECONDS = 120
#: How long the worker may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS = 15


class WorkerError(RuntimeError):
    """The worker did not start, or stopped while the suite still needed it."""


class WasmqWorker:
    """A running ``wasmq worker`` process and its log."""

    def __init__(self, process, log_path, node_name, broker_url):
        self.process = process
        self.log_path = log_path
        self.hostname = node_name
        self._broker_url = broker_url

    @classmethod
    def start(cls, binary, plugins, environment, log_dir):
        """Starts a worker on ``environment``'s vhost and Redis database.

        ``plugins`` is a folder holding the built plugin (``.wasm``); the worker watches it.
        """
        binary = Path(binary)
        if not binary.is_file():
            raise WorkerError(
                f"no wasmq binary at {binary} (build it with `cargo build --release`, "
                "or set WASMQ_BIN)"
            )
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "wasmq-worker.log"
        node_name = f"wasmq-suite-{os.getpid()}@{socket.gethostname()}"
        command = [
            str(binary),
            "worker",
            "--broker", environment.wasmq_broker_url,
            "--result-backend", environment.backend_url,
            "--plugins", str(plugins),
            "--queues", "celery",
            "--name", node_name,
            # As Celery's test worker (start_worker(concurrency=1)): one task at a time. The
            # prefetch multiplier stays wasmq's: Celery acknowledges a message when its task
            # starts, wasmq when it ends, so Celery's 4 would hold back messages Celery's
            # worker has already taken (test_expired's message then expires in the broker).
            "--concurrency", "1",
            "--state-file", str(log_dir / "revoked.json"),
            "--shutdown-timeout", "5s",
        ]
        env = dict(os.environ)
        env.setdefault("WASMQ_LOG", "info")
        env["NO_COLOR"] = "1"
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own process group: a Ctrl-C meant for pytest does not reach it first.
                start_new_session=True,
            )
        worker = cls(process, log_path, node_name, environment.celery_broker_url)
        try:
            worker.wait_until_consuming()
        except BaseException:
            worker.stop()
            raise
        return worker

    def wait_until_consuming(self, queue="celery", timeout=START_TIMEOUT_SECONDS):
        """Waits until the worker consumes ``queue`` (it has declared it and subscribed)."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with Connection(self._broker_url, connect_timeout=5) as connection:
                    channel = connection.channel()
                    # A passive declare fails (404) until the worker has declared the queue.
                    _, _, consumers = channel.queue_declare(queue=queue, passive=True)
                    if consumers > 0:
                        return
                    last_error = "the queue exists but has no consumer yet"
            except Exception as e:  # noqa: BLE001 - any broker error means "not yet"
                last_error = repr(e)
            time.sleep(0.2)
        raise WorkerError(
            f"the wasmq worker did not consume {queue!r} within {timeout}s "
            f"(last check: {last_error})\n{self.tail()}"
        )

    def check_alive(self):
        """Raises if the worker process has exited."""
        code = self.process.poll()
        if code is not None:
            raise WorkerError(f"the wasmq worker exited with status {code}\n{self.tail()}")

    def log_size(self):
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset, max_lines=80):
        """The last ``max_lines`` lines written to the log after byte ``offset``."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        lines = text.splitlines()
        if len(lines) > max_lines:
            lines = [f"… {len(lines) - max_lines} earlier lines in {self.log_path}"] + lines[
                -max_lines:
            ]
        return "\n".join(lines)

    def tail(self, max_lines=40):
        """The end of the log, for error messages."""
        return f"--- last lines of {self.log_path} ---\n" + self.log_since(0, max_lines)

    def stop(self):
        """SIGTERM (a graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# Registered under Celery's name: the plugin puts this function in place of
# ``celery.contrib.pytest.celery_session_worker`` before Celery's conftest imports it.
@pytest.fixture(scope="session", name="celery_session_worker")
def wasmq_session_worker(request, celery_session_app, celery_includes, celery_class_tasks):
    """Session fixture: the wasmq worker (started when collection finished) instead of an
    in-process Celery worker.

    As Celery's fixture does, it imports ``celery_includes`` and registers
    ``celery_class_tasks`` in the client app, so tests can call those tasks by their objects.
    """
    for module in celery_includes:
        celery_session_app.loader.import_task_module(module)
    for class_task in celery_class_tasks:
        celery_session_app.register_task(class_task)
    from .plugin import running_worker

    worker = running_worker(request.config)
    worker.check_alive()
    yield worker
