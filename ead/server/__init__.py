"""An OpenAI-compatible HTTP server for EAD: `ead serve`.

    protocol.py    request validation, response and stream-chunk shapes, errors in OpenAI's shape
    worker.py      the engine thread: owns the BatchEngine, admits, steps, cancels, hands tokens back
    prometheus.py  counters and histograms, rendered as Prometheus text
    app.py         routes only: auth, body limits, 429, SSE, disconnects
    cli.py         `ead serve` flags -> load the pair -> run uvicorn

Needs the `serve` extra (starlette, uvicorn): pip install 'ead[serve]'.
"""
