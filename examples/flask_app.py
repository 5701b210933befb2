"""A Flask app for a pre-fork server; otel-gil comes in through auto-instrumentation.

    OTEL_SERVICE_NAME=gil-flask opentelemetry-instrument \\
        gunicorn -w 2 --threads 4 --chdir examples flask_app:app

No otel-gil code: `opentelemetry-instrument` instruments Flask (one SERVER span
per request) and calls `otel_gil.instrument()` in the master; every worker it
forks registers with the master's sidecar, and its GIL waits arrive as
`gil.wait` children of its request spans.

    GET /work    the handler burns ~20 ms of bytecode while a helper thread
                 (outside any span) burns and compresses too: the two hand the
                 GIL to each other every switch interval (5 ms), so the handler
                 waits for it. Answers {"pid": worker pid, "live": GIL tracing
                 is live in this worker}.
"""

from __future__ import annotations

import os
import threading
import zlib
from typing import Dict, Union

from flask import Flask

import otel_gil

app = Flask(__name__)
PAYLOAD = os.urandom(64 * 1024)


def burn(rounds: int, compress: bool = False) -> int:
    total = 0
    for i in range(rounds):
        total += sum(j * j for j in range(2_000))
        if compress and i % 32 == 0:
            total += zlib.crc32(zlib.compress(PAYLOAD, 1))  # releases the GIL meanwhile
    return total


@app.route("/work")
def work() -> Dict[str, Union[int, bool]]:
    helper = threading.Thread(target=burn, args=(300, True), name="helper")
    helper.start()
    result = burn(300)
    helper.join()
    return {"pid": os.getpid(), "live": otel_gil.wait_until_live(0), "result": result & 0xFFFF}
