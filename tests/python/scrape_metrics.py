"""Scrapes a wasmq worker's /metrics and parses it with the official Prometheus Python
parser (prometheus_client's OpenMetrics parser, which rejects anything malformed).

Reads URL from the environment (and writes the classic-format text a scraper that does
not ask for OpenMetrics gets to RAW, when set); prints one JSON object: every sample as
[name, labels, value], and the HTTP status of /healthz and /readyz.
"""

import json
import os
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

base = os.environ["URL"].rstrip("/")
report = {}
request = urllib.request.Request(
    base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
)
with urllib.request.urlopen(request, timeout=10) as response:
    report["content_type"] = response.headers.get("Content-Type")
    text = response.read().decode()
if os.environ.get("RAW"):
    # What a scraper that does not ask for OpenMetrics gets (promtool lints it).
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        report["classic_content_type"] = response.headers.get("Content-Type")
        with open(os.environ["RAW"], "w") as raw:
            raw.write(response.read().decode())
samples = []
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        samples.append([sample.name, sample.labels, sample.value])
report["samples"] = samples
for path in ("/healthz", "/readyz"):
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            report[path] = response.status
    except urllib.error.HTTPError as error:
        report[path] = error.code
print(json.dumps(report))
