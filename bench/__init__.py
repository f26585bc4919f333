"""Benchmarks: Tidings against Celery and against the raw HTTP limit, on loopback (issue 5)."""
