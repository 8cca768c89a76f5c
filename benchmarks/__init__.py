"""Benchmarks: each one runs the compared variants side by side, in one process, and prints ratios."""
