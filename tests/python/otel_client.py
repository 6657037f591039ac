"""An unmodified Python Celery client traced by OpenTelemetry's Celery instrumentation
(`opentelemetry-instrumentation-celery`, from PyPI), sending a chain to wasmq workers.

Reads BROKER, BACKEND and QUEUE from the environment. Inside a span of its own
("request") it sends `math.add(2, 2) | math.mul(10)`; the instrumentation opens a
producer span and injects its W3C `traceparent` into the message headers, as it does for
any Celery client. Prints one JSON object: the request's trace id, the producer span's id,
the chain's task ids and its result.
"""

import json
import os

from celery import Celery, chain
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
CeleryInstrumentor().instrument()

app = Celery("otel-client", broker=os.environ["BROKER"], backend=os.environ["BACKEND"])
queue = os.environ["QUEUE"]

with trace.get_tracer("wasmq-test").start_as_current_span("request") as request:
    result = chain(
        app.signature("math.add", (2, 2), queue=queue),
        app.signature("math.mul", (10,), queue=queue),
    ).apply_async()
value = result.get(timeout=30)

producers = [
    span for span in exporter.get_finished_spans() if span.kind == trace.SpanKind.PRODUCER
]
print(
    json.dumps(
        {
            "trace_id": format(request.get_span_context().trace_id, "032x"),
            "producer_span_ids": [format(s.context.span_id, "016x") for s in producers],
            "producer_trace_ids": [format(s.context.trace_id, "032x") for s in producers],
            "ids": [result.parent.id, result.id],
            "value": value,
        }
    )
)
