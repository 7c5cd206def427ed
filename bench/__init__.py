"""Rerunnable benchmarks and studies of the service and the pipeline, one module each.

Run them from the repository root as `python -m bench.NAME` (e.g. `python -m bench.serve --json`);
`--help` tells each one's flags. What several share (logging, the bench's demo and model, a served app
and its load generators) lives in bench.harness.
"""
