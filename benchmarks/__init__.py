"""Benchmarks: scripts that measure ratios side by side in one run and write JSON.

Run each from the repository root as a module, e.g. ``python -m benchmarks.distill_quality --help``;
``benchmarks.common`` holds what they share (the JSON writer, paired statistics, ``--smoke``).
Every module has a ``--smoke`` setting (its ``SMOKE`` arguments: the same code at a size that
runs in seconds) and a ``main(argv)``; tests/test_benchmarks.py runs each at it and checks its
JSON against the published one in docs/benchmarks.
"""
