"""Benchmarks: scripts that measure ratios side by side in one run and write JSON.

Run each from the repository root as a module, e.g. ``python -m benchmarks.distill_quality --help``;
``benchmarks.common`` holds what they share (the JSON writer, paired statistics).
"""
