"""System (b): what a Python team would build with Celery 5 and RabbitMQ.

A task POSTs the stored body; on a non-2xx answer or an error it retries with a `countdown`
taken from the same ladder Tidings uses. `acks_late`, no result backend, a thread pool.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import httpx
from celery import Celery  # type: ignore[import-untyped]

_local = threading.local()


def _client(timeout_s: float) -> httpx.Client:
    """One keep-alive HTTP client per worker thread."""
    client: httpx.Client | None = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client(timeout=timeout_s, follow_redirects=False)
    return client


def make_app(
    broker_url: str,
    queue: str,
    *,
    ladder_s: Sequence[float],
    timeout_s: float,
    pool_limit: int = 64,
) -> Celery:
    """The Celery app with its one task, `bench.deliver`."""
    app = Celery("bench", broker=broker_url)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_serializer="json",
        accept_content=["json"],
        # Enough producer connections that 64 submitting threads do not queue for one.
        broker_pool_limit=pool_limit,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    ladder = list(ladder_s)

    @app.task(  # type: ignore[untyped-decorator]
        bind=True, name="bench.deliver", acks_late=True, max_retries=len(ladder)
    )
    def deliver(self: Any, url: str, body: str, notification_id: str) -> None:
        """POST the body; retry later on the ladder unless the receiver answered 2xx."""
        try:
            response = _client(timeout_s).post(
                url,
                content=body.encode("utf-8"),
                headers={"content-type": "application/json", "webhook-id": notification_id},
            )
            succeeded = 200 <= response.status_code < 300
        except httpx.HTTPError:
            succeeded = False
        if succeeded:
            return
        retries: int = self.request.retries
        if retries >= len(ladder):
            return  # exhausted: the window of attempts is over
        raise self.retry(countdown=ladder[retries])

    return app
