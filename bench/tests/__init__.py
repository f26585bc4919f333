"""Checks of the benchmark harness itself (run: pytest bench/tests)."""
