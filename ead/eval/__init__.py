"""The evaluation harness: benchmarks (datasets.py), answer extraction and grading (grading.py), the
random-routing control (control.py), resumable runs (runs.py), reports (report.py) and the `ead eval`,
`ead sweep` and `ead report` subcommands (cli.py).

It drives the engine through one function, `runs.generate_rows`, and derives nothing about routing itself:
per-token numbers come from `ead.metrics`.
"""
