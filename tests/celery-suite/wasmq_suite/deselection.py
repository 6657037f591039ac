"""The tests of Celery's suite that are not run, each with the reason.

``deselected.txt`` lists them grouped under a reason line::

    [replace] Task.replace: the task swaps itself for a new canvas on the worker
    t/integration/test_canvas.py::test_chain::test_complex_chain

A test id without a ``[parameters]`` suffix covers every parametrisation of that test.
Blank lines and lines starting with ``#`` are comments. The same selection applies whichever
worker runs the suite, so the Celery reference run proves that every selected test passes
with Celery's own worker.
"""

from dataclasses import dataclass, field
from pathlib import Path


class DeselectionError(ValueError):
    """``deselected.txt`` is malformed."""


@dataclass
class Reason:
    """One reason for deselecting tests, and the tests deselected for it."""

    key: str
    text: str
    test_ids: list = field(default_factory=list)


@dataclass
class Deselection:
    """The parsed ``deselected.txt``."""

    reasons: list

    @classmethod
    def load(cls, path):
        reasons = []
        seen = {}
        for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                key, sep, text = line[1:].partition("]")
                if not sep or not key or not text.strip():
                    raise DeselectionError(f"{path}:{number}: expected `[key] reason`")
                reasons.append(Reason(key.strip(), text.strip()))
                continue
            if not reasons:
                raise DeselectionError(f"{path}:{number}: a test id before any `[key] reason`")
            if "::" not in line:
                raise DeselectionError(f"{path}:{number}: not a test id: {line!r}")
            if line in seen:
                raise DeselectionError(
                    f"{path}:{number}: {line} is listed twice (first on line {seen[line]})"
                )
            seen[line] = number
            reasons[-1].test_ids.append(line)
        return cls(reasons)

    def reason_for(self, nodeid):
        """The reason a collected test is deselected, or None if it is selected."""
        base = nodeid.split("[", 1)[0]
        for reason in self.reasons:
            if nodeid in reason.test_ids or base in reason.test_ids:
                return reason
        return None

    def unmatched(self, nodeids):
        """Listed test ids that match none of ``nodeids`` (stale entries)."""
        present = set(nodeids) | {n.split("[", 1)[0] for n in nodeids}
        return [t for r in self.reasons for t in r.test_ids if t not in present]
