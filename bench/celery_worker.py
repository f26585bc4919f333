"""The app `celery -A bench.celery_worker worker` loads; configured by BENCH_CELERY_* vars."""

from __future__ import annotations

import os

from bench.celery_app import make_app

app = make_app(
    os.environ["BENCH_CELERY_BROKER"],
    os.environ["BENCH_CELERY_QUEUE"],
    ladder_s=[float(step) for step in os.environ["BENCH_CELERY_LADDER_S"].split(",")],
    timeout_s=float(os.environ["BENCH_CELERY_TIMEOUT_S"]),
)
