"""Unit tests of the SDK with CPython, outside any sandbox: binding, classification of
endings, describe's fields. Run with `python3 -m unittest discover -s sdk-python/tests`
(module names matter: tasks here are named `test_sdk.*`). The end-to-end behaviour in a worker is tested by
tests/all/python_tasks.rs."""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from wasmq import REGISTRY, Reject, Retry, current, task  # noqa: E402
from wasmq._context import Host  # noqa: E402


class RecordingHost(Host):
    def __init__(self):
        self.records = []

    def log(self, level, message):
        self.records.append(("log", level, message))

    def update_state(self, state, meta_json):
        self.records.append(("state", state, json.loads(meta_json)))

    def soft_time_left_ms(self):
        return 0


class QuotaError(Exception):
    pass


@task
def add(a, b):
    """Adds."""
    return a + b


@task(name="t.opts", timeout=2, soft_timeout="1500ms", fuel=10**9, memory="64MiB",
      autoretry_for=(OSError,), max_retries=3, default_retry_delay=5, rate_limit="10/s",
      ignore_result=True)
def opts(ctx, x, *rest, flag=False, **extra):
    ctx.log("warning", f"x={x}")
    ctx.update_state("PROGRESS", {"x": x})
    return [x, list(rest), flag, extra, ctx.should_stop(), current() is ctx]


@task(name="t.kwonly")
def kwonly(a, *, b=1):
    return a + b


@task(name="t.fail")
def fail(kind):
    if kind == "zero":
        return 1 / 0
    if kind == "quota":
        raise QuotaError(5, "over")
    if kind == "key":
        raise KeyError("k")
    if kind == "retry":
        raise Retry(countdown=1.5, exc=ValueError("spent"), max_retries=7)
    if kind == "retry-args":
        raise Retry(args=[2])
    if kind == "reject":
        raise Reject("no", requeue=True)
    if kind == "set":
        return {1}
    if kind == "file":
        open("/no/such/file/for/wasmq")


def run(name, args="[]", kwargs="{}", host=None):
    return REGISTRY[name].run(host or RecordingHost(), {"id": "i1", "task": name}, args, kwargs)


class Tests(unittest.TestCase):
    def test_names_and_params(self):
        self.assertEqual(REGISTRY["test_sdk.add"].params, ["a", "b"])
        self.assertEqual(REGISTRY["t.opts"].params, ["x", "*rest", "flag", "**extra"])
        self.assertEqual(REGISTRY["t.kwonly"].params, ["a", "*", "b"])
        self.assertEqual(REGISTRY["test_sdk.add"].doc, "Adds.")
        self.assertEqual(add(2, 3), 5, "a task stays callable as the function")

    def test_options(self):
        t = REGISTRY["t.opts"]
        self.assertEqual(t.limits, {"fuel": 10**9, "memory_bytes": 64 << 20, "timeout_ms": 2000,
                                    "soft_timeout_ms": 1500})
        self.assertEqual(t.policy["max_retries"], 3)
        self.assertEqual(t.policy["default_retry_delay_ms"], 5000)
        self.assertEqual(t.policy["rate_limit"], "10/s")
        self.assertIn("OSError", t.policy["autoretry_for"])
        self.assertIn("ConnectionRefusedError", t.policy["autoretry_for"], "subclasses too")
        self.assertTrue(t.ignore_result)

    def test_bad_options(self):
        with self.assertRaisesRegex(TypeError, "unknown option"):
            task(colour="red")(lambda: 1)
        with self.assertRaisesRegex(ValueError, "soft_timeout is above timeout"):
            task(name="t.bad", timeout=1, soft_timeout=2)(lambda: 1)
        with self.assertRaisesRegex(ValueError, "rate like"):
            task(name="t.bad2", rate_limit="fast")(lambda: 1)

    def test_success_and_ctx(self):
        host = RecordingHost()
        out = run("t.opts", "[1, 2, 3]", '{"flag": true, "z": 4}', host)
        self.assertEqual(json.loads(out.result), [1, [2, 3], True, {"z": 4}, True, True])
        self.assertEqual(host.records, [("log", "warn", "x=1"), ("state", "PROGRESS", {"x": 1})])

    def test_binding_errors_name_task_and_parameter(self):
        self.assertEqual(run("test_sdk.add", "[1]").invalid_arguments,
                         "test_sdk.add(a, b): missing a required argument: 'b'")
        self.assertIn("unexpected keyword argument 'c'",
                      run("test_sdk.add", "[1, 2]", '{"c": 1}').invalid_arguments)
        self.assertIn("too many positional arguments", run("test_sdk.add", "[1, 2, 3]").invalid_arguments)
        self.assertIn("multiple values for argument 'a'",
                      run("test_sdk.add", "[1, 2]", '{"a": 1}').invalid_arguments)
        self.assertIn("not JSON", run("test_sdk.add", "[1,").invalid_arguments)
        self.assertIn("'ctx'", run("t.opts", "[1]", '{"ctx": 1}').invalid_arguments)

    def test_failures(self):
        self.assertEqual(run("t.fail", '["zero"]').failed, ("ZeroDivisionError", "division by zero", None))
        self.assertEqual(run("t.fail", '["quota"]').failed, ("test_sdk.QuotaError", "(5, 'over')", '[5, "over"]'))
        self.assertEqual(run("t.fail", '["key"]').failed, ("KeyError", "'k'", '["k"]'))
        kind, message, args = run("t.fail", '["file"]').failed
        self.assertEqual(kind, "FileNotFoundError")
        self.assertIn("/no/such/file/for/wasmq", message)
        self.assertEqual(json.loads(args)[2], "/no/such/file/for/wasmq")
        self.assertEqual(str(FileNotFoundError(*json.loads(args))), message, "the client rebuilds it")
        kind, message, _ = run("t.fail", '["set"]').failed
        self.assertEqual(kind, "kombu.exceptions.EncodeError")
        self.assertIn("t.fail: the result is not JSON-serialisable (set)", message)

    def test_retry_and_reject(self):
        r = run("t.fail", '["retry"]').retry
        self.assertEqual(r["countdown_ms"], 1500)
        self.assertEqual(r["max_retries"], 7)
        self.assertEqual(r["exc"], ("ValueError", "spent", None))
        self.assertEqual(r["reason"], "ValueError: spent")
        r = run("t.fail", "[]", '{"kind": "retry-args"}').retry
        self.assertEqual((r["args_json"], r["kwargs_json"]), ("[2]", "{}"))
        self.assertEqual(run("t.fail", '["reject"]').reject, ("no", True))

