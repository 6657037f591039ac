"""An unmodified Python Celery client running canvas workflows on wasmq workers.

No task code: every signature is built by name (`app.signature("math.add", ...)`). Reads
BROKER, BACKEND and QUEUE from the environment and prints one JSON object: for each
workflow either {"ok": value} or the exception the client raised.
"""

import json
import os
import sys

from celery import Celery, chain, chord, group
from celery.canvas import xstarmap
from celery.exceptions import ChordError

app = Celery("canvas_client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
app.conf.task_default_queue = os.environ["QUEUE"]
TIMEOUT = 30


def s(name, *args):
    return app.signature(name, args=args)


def si(name, *args):
    return app.signature(name, args=args, immutable=True)


def outcome(run):
    try:
        return {"ok": run()}
    except Exception as error:  # noqa: BLE001 - we report what Celery raised
        return {
            "error": type(error).__name__,
            "message": str(error),
            "is_chord_error": isinstance(error, ChordError),
        }


def linked():
    callback = s("math.mul", 10)
    pending = callback.freeze()  # pre-assigns the callback's task id
    result = s("math.add", 2, 3).apply_async(link=callback)
    return [result.get(timeout=TIMEOUT), pending.get(timeout=TIMEOUT)]


results = {
    "chain": outcome(lambda: chain(s("math.add", 2, 2), s("math.add", 4)).apply_async().get(timeout=TIMEOUT)),
    "chain3": outcome(
        lambda: (s("math.add", 2, 2) | s("math.add", 4) | s("math.mul", 10)).apply_async().get(timeout=TIMEOUT)
    ),
    "immutable": outcome(
        lambda: chain(s("math.add", 1, 1), si("math.add", 5, 5), s("math.mul", 2)).apply_async().get(timeout=TIMEOUT)
    ),
    "link": outcome(linked),
    "group": outcome(lambda: group(s("math.add", i, i) for i in range(5)).apply_async().get(timeout=TIMEOUT)),
    "chord": outcome(
        lambda: chord([s("math.add", i, i) for i in range(10)], s("math.sum")).apply_async().get(timeout=TIMEOUT)
    ),
    # The body's own result (a fresh AsyncResult: `get()` on the one chord returns would
    # re-raise the failed header member's error first, from its parent).
    "chord_failure": outcome(
        lambda: app.AsyncResult(
            chord([s("math.add", 1, 1), s("math.div", 1, 0)], s("math.sum")).apply_async().id
        ).get(timeout=TIMEOUT)
    ),
    "chain_failure": outcome(
        lambda: chain(s("math.add", 1, 1), s("math.div", 0), s("math.add", 1)).apply_async().get(timeout=TIMEOUT)
    ),
}
# Issue 20: workflows Celery's own suite found stopping on wasmq workers.
results["chain_after_chord"] = outcome(
    lambda: (
        group(s("math.add", 1, 1), s("math.add", 1, 1))
        | s("math.sum")
        | s("math.div", 2)
        | group(s("math.div", 1), s("math.div", 2))
    ).apply_async().get(timeout=TIMEOUT)
)
results["chords_in_chain_failure"] = outcome(
    lambda: app.AsyncResult(
        chain(
            chord([s("math.add", 1, 1), s("math.div", 1, 0)], s("math.sum")),
            chord([s("math.div", 2), s("math.div", 3)], s("math.sum")),
        ).apply_async().id
    ).get(timeout=TIMEOUT)
)
results["nested_header"] = outcome(
    lambda: chord(
        group(chain(si("math.add", 40, 2), group(s("math.identity"), s("math.identity")))),
        s("math.identity"),
    ).apply_async().get(timeout=TIMEOUT)
)
results["chord_chain_chord"] = outcome(
    lambda: chain(
        si("math.identity", 1),
        chord(
            [
                si("math.identity", 2),
                chain(
                    si("math.identity", 3),
                    chord([si("math.identity", 4), si("math.identity", 5)], si("math.identity", 6)),
                ),
            ],
            si("math.identity", 7),
        ),
    ).apply_async().get(timeout=TIMEOUT)
)
results["starmap"] = outcome(
    # What `add.starmap(...)` builds for a task the client knows only by name.
    lambda: group(xstarmap(s("math.add"), [(1, 1), (2, 2)]), s("math.add", 3, 3))
    .apply_async()
    .get(timeout=TIMEOUT)
)
json.dump(results, sys.stdout)
