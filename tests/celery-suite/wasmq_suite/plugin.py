"""pytest plugin: Celery's own integration suite against a wasmq worker.

Loaded with ``-p wasmq_suite.plugin`` (``pytest.ini`` does it), over Celery's vendored,
unmodified ``t/integration`` files. It

* creates a private RabbitMQ vhost and Redis database for the run and points Celery's
  ``conftest.py`` at them (``TEST_BROKER``/``TEST_BACKEND``), before that conftest is
  imported;
* with ``--suite-worker=wasmq`` (the default), replaces Celery's in-process session worker
  with a ``wasmq worker`` process: ``celery.contrib.pytest.celery_session_worker`` is swapped
  for :func:`wasmq_suite.worker.wasmq_session_worker` before Celery's conftest imports it
  under that name. With ``--suite-worker=celery`` nothing is swapped, and the same selection
  runs on Celery's own worker (the reference run);
* deselects the tests listed in ``deselected.txt`` (see :mod:`wasmq_suite.deselection`);
* gives every test a time limit of ``--suite-test-timeout`` seconds (more for the few
  :data:`SLOW_TESTS`), replacing the suite's own ``timeout`` marks (300 s on most), so a
  workflow that never finishes costs seconds, not minutes;
* attaches the worker's log lines written during a failed test to its report, and prints the
  pass count at the end.
"""

import os
import tempfile
from pathlib import Path

import pytest

from .deselection import Deselection
from .environment import SetupError, SuiteEnvironment

SUITE_DIR = Path(__file__).resolve().parent.parent
DESELECTED_FILE = SUITE_DIR / "deselected.txt"

ENVIRONMENT = pytest.StashKey()
WORKER = pytest.StashKey()
DESELECTION = pytest.StashKey()
LOG_OFFSET = pytest.StashKey()
SELECTED = pytest.StashKey()

#: Tests that take longer than the default limit on Celery's own worker (the reference run
#: on 2 cores), because they wait on countdowns, sleeping tasks, 1000-task groups or a reply
#: timeout by design. Measured there, setup to teardown: test_retry 31 s,
#: test_revoked_by_headers_complex_canvas 44 s, test_expired 17 s, test_timeout 11 s and
#: test_revoked 10 s (the teardown waits for their sleeping tasks),
#: test_revoke_keeps_state_of_task_started_elsewhere 11 s (a 10 s reply timeout),
#: test_chain_error_handler_with_eta 11 s (a 10 s ETA), test_chain_to_a_chord_with_large_header
#: 7-23 s, test_large_header 7-14 s, test_large_group 8-12 s. On wasmq
#: test_revoked_by_headers_complex_canvas takes about 65 s: its 22 canvases hold 30
#: sleeping(2) tasks that are not revoked, and the worker (one slot, as Celery's test worker)
#: runs them one after another; teardown then waits for the last.
SLOW_TESTS = {
    "t/integration/test_tasks.py::test_tasks::test_retry": 60,
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas": 120,
    "t/integration/test_tasks.py::test_tasks::test_expired": 40,
    "t/integration/test_tasks.py::test_tasks::test_revoked": 30,
    "t/integration/test_tasks.py::test_tasks::test_timeout": 30,
    "t/integration/test_tasks.py::test_tasks::test_revoke_keeps_state_of_task_started_elsewhere": 30,
    "t/integration/test_canvas.py::test_chain::test_chain_error_handler_with_eta": 30,
    "t/integration/test_canvas.py::test_chord::test_chain_to_a_chord_with_large_header": 45,
    "t/integration/test_canvas.py::test_chord::test_large_header": 40,
    "t/integration/test_canvas.py::test_group::test_large_group": 40,
}

# Worst first: a test's outcome is the worst of its reports (setup, call, subtests, teardown).
OUTCOME_ORDER = ("failed", "error", "xpassed", "skipped", "xfailed", "passed")


def pytest_addoption(parser):
    group = parser.getgroup("wasmq-suite", "Celery's integration suite against wasmq")
    group.addoption(
        "--suite-worker",
        choices=("wasmq", "celery"),
        default=os.environ.get("WASMQ_SUITE_WORKER", "wasmq"),
        help="run the tasks on a wasmq worker process (default) or on Celery's own "
        "in-process worker (the reference run). Env: WASMQ_SUITE_WORKER.",
    )
    group.addoption(
        "--wasmq-bin",
        default=os.environ.get("WASMQ_BIN"),
        help="the wasmq binary. Env: WASMQ_BIN. Default: $CARGO_TARGET_DIR/release/wasmq, "
        "else target/release/wasmq of the repository.",
    )
    group.addoption(
        "--wasmq-plugins",
        default=os.environ.get("WASMQ_SUITE_PLUGINS"),
        help="folder holding the built suite plugin (.wasm). Env: WASMQ_SUITE_PLUGINS.",
    )
    group.addoption(
        "--suite-log-dir",
        default=os.environ.get("WASMQ_SUITE_LOG_DIR"),
        help="where the worker's log and state go. Env: WASMQ_SUITE_LOG_DIR. "
        "Default: a new temporary folder.",
    )
    group.addoption(
        "--suite-test-timeout",
        type=float,
        default=float(os.environ.get("WASMQ_SUITE_TEST_TIMEOUT", "15")),
        help="time limit of every test in seconds (at least SLOW_TESTS' for those), "
        "replacing the suite's own marks (0: keep the suite's). "
        "Env: WASMQ_SUITE_TEST_TIMEOUT. Default: 15.",
    )
    group.addoption(
        "--suite-amqp",
        default=os.environ.get("WASMQ_SUITE_AMQP", "amqp://guest:guest@127.0.0.1:5672"),
        help="the RabbitMQ server the private vhost is created on. Env: WASMQ_SUITE_AMQP.",
    )
    group.addoption(
        "--suite-redis",
        default=os.environ.get("WASMQ_SUITE_REDIS", "redis://127.0.0.1:6379"),
        help="the Redis server a private database is claimed on. Env: WASMQ_SUITE_REDIS.",
    )
    group.addoption(
        "--check-deselected",
        action="store_true",
        help="fail if deselected.txt lists a test that was not collected (a stale entry).",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """Runs before Celery's conftest is imported: it reads the broker and backend URLs at
    import time, and imports ``celery_session_worker`` from ``celery.contrib.pytest``."""
    options = early_config.known_args_namespace
    try:
        environment = SuiteEnvironment.create(options.suite_amqp, options.suite_redis)
    except SetupError as e:
        raise pytest.UsageError(f"cannot set up a private vhost and Redis database: {e}") from e
    early_config.add_cleanup(environment.destroy)
    environment.export()
    early_config.stash[ENVIRONMENT] = environment
    early_config.stash[DESELECTION] = Deselection.load(DESELECTED_FILE)
    if options.suite_worker == "wasmq":
        import celery.contrib.pytest

        from .worker import wasmq_session_worker

        celery.contrib.pytest.celery_session_worker = wasmq_session_worker


def pytest_collection_modifyitems(session, config, items):
    deselection = config.stash[DESELECTION]
    if config.getoption("check_deselected"):
        stale = deselection.unmatched([item.nodeid for item in items])
        if stale:
            raise pytest.UsageError(
                f"{DESELECTED_FILE} lists tests that do not exist: " + ", ".join(stale)
            )
    selected, deselected = [], []
    for item in items:
        (deselected if deselection.reason_for(item.nodeid) else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
    timeout = config.getoption("suite_test_timeout")
    if timeout > 0:
        for item in items:
            limit = max(timeout, SLOW_TESTS.get(item.nodeid.split("[", 1)[0], 0))
            # Put first, so it is the closest `timeout` mark and wins over the suite's own.
            item.add_marker(pytest.mark.timeout(limit), append=False)


def pytest_collection_finish(session):
    """Starts the wasmq worker once the selection is known (not inside a test, so its start,
    which may compile the plugin, does not count against the first test's time limit)."""
    config = session.config
    # After -k/-m as well: the tests that will run.
    config.stash[SELECTED] = len(session.items)
    if config.getoption("suite_worker") != "wasmq" or config.option.collectonly:
        return
    if not session.items:
        return
    from .worker import WasmqWorker, WorkerError

    binary = config.getoption("wasmq_bin") or default_binary()
    plugins = config.getoption("wasmq_plugins")
    if not plugins:
        raise pytest.UsageError("--wasmq-plugins (or WASMQ_SUITE_PLUGINS) is required")
    log_dir = config.getoption("suite_log_dir") or tempfile.mkdtemp(prefix="wasmq-celery-suite-")
    try:
        worker = WasmqWorker.start(binary, plugins, config.stash[ENVIRONMENT], log_dir)
    except WorkerError as e:
        pytest.exit(f"cannot start the wasmq worker: {e}", returncode=3)
    # Cleanups run last-in first-out: the worker stops before its vhost is deleted.
    config.add_cleanup(worker.stop)
    config.stash[WORKER] = worker


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        return Path(target) / "release" / "wasmq"
    return SUITE_DIR.parent.parent / "target" / "release" / "wasmq"


def running_worker(config):
    """The wasmq worker of this run (for the session fixture)."""
    worker = config.stash.get(WORKER, None)
    if worker is None:
        pytest.fail("the wasmq worker was not started (no test was collected?)")
    return worker


def pytest_runtest_setup(item):
    worker = item.config.stash.get(WORKER, None)
    item.stash[LOG_OFFSET] = worker.log_size() if worker else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    worker = item.config.stash.get(WORKER, None)
    if worker is not None and report.failed and call.when in ("setup", "call"):
        report.sections.append(
            ("wasmq worker log during this test", worker.log_since(item.stash[LOG_OFFSET]))
        )


def pytest_configure(config):
    config.pluginmanager.register(SuiteSummary(config), "wasmq-suite-summary")


class SuiteSummary:
    """Counts each selected test once, by its worst report (subtests included), and prints
    the pass count."""

    def __init__(self, config):
        self.config = config
        self.outcomes = {}

    def pytest_runtest_logreport(self, report):
        if report.passed and report.when != "call":
            # A passing setup or teardown says nothing yet: a test interrupted before its
            # call has no outcome.
            return
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
        elif hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.skipped:
            outcome = "skipped"
        else:
            outcome = "passed"
        previous = self.outcomes.get(report.nodeid, "passed")
        self.outcomes[report.nodeid] = min(previous, outcome, key=OUTCOME_ORDER.index)

    def pytest_terminal_summary(self, terminalreporter):
        summarize(self.config, terminalreporter, self.outcomes)


def summarize(config, terminalreporter, outcomes):
    if not outcomes:
        return
    counts = {name: 0 for name in OUTCOME_ORDER}
    for outcome in outcomes.values():
        counts[outcome] += 1
    total = config.stash.get(SELECTED, len(outcomes))
    not_run = total - len(outcomes)
    # An xfail mark is a bug of Celery's own worker (the mark names the issue); a test that
    # passes on wasmq anyway is a pass, not a failure (the run turns xfail_strict off).
    good = counts["passed"] + counts["xfailed"] + counts["xpassed"]
    worker = config.getoption("suite_worker")
    write = terminalreporter.write_line
    terminalreporter.section(f"Celery's integration suite on the {worker} worker")
    write(
        f"{good}/{total} selected tests pass "
        f"({counts['passed']} passed, {counts['xfailed']} failed as Celery's xfail marks "
        f"expect); {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['xpassed']} passed where Celery's own worker fails (its xfail marks), "
        f"{counts['skipped']} skipped"
        + (f", {not_run} not run (interrupted)" if not_run > 0 else "")
    )
    deselection = config.stash[DESELECTION]
    deselected = terminalreporter.stats.get("deselected", [])
    if deselected:
        by_reason = {}
        for item in deselected:
            reason = deselection.reason_for(item.nodeid)
            key = reason.key if reason else "(-k/-m)"
            by_reason[key] = by_reason.get(key, 0) + 1
        write(
            f"{len(deselected)} deselected: "
            + ", ".join(f"{key} {n}" for key, n in sorted(by_reason.items()))
            + f" (reasons in {DESELECTED_FILE.name})"
        )
    worker_process = config.stash.get(WORKER, None)
    if worker_process is not None:
        write(f"wasmq worker log: {worker_process.log_path}")
