"""Benchmark harness of mlcl_fast: microbenchmarks (pytest-benchmark) and the sweep (bench.sweep).

See bench/README.md. Modules: labels (label generators), published (the dense formulation of the
authors' REG code), providers (what gets timed), grid (the sweep's points), timing (timers and
memory probes), worker (one point), sweep (the command), records (CSV), plots, report.
"""
