"""From a receiver's answer to an outcome: delivered, retry at a time, or exhausted."""

from __future__ import annotations

import random
from dataclasses import replace

from tidings.dispatch.http import HttpResult
from tidings.models import Attempt, Claim, Endpoint, Outcome, OutcomeKind


def attempt_from_result(claim: Claim, result: HttpResult, succeeded: bool) -> Attempt:
    """The attempt record of one HTTP result."""
    return Attempt(
        delivery_id=claim.delivery_id,
        number=claim.attempt_number,
        started_at=result.started_at,
        duration_ms=result.duration_ms,
        succeeded=succeeded,
        status_code=result.status_code,
        error_class=result.error_class,
        error_detail=result.error_detail,
        response_excerpt=result.body_head,
        location=result.location,
        retry_after_s=result.retry_after_s,
    )


def decide_outcome(
    claim: Claim,
    endpoint: Endpoint,
    attempt: Attempt,
    *,
    now: float,
    rng: random.Random | None = None,
) -> Outcome:
    """Apply the endpoint's schedule to a finished attempt."""
    if attempt.succeeded:
        return Outcome(claim, attempt, OutcomeKind.DELIVERED)
    decision = endpoint.schedule.after_failure(
        attempt_number=claim.attempt_number,
        deadline_at=claim.deadline_at,
        now=now,
        retry_after_s=attempt.retry_after_s,
        rng=rng,
    )
    if decision.next_attempt_at is None:
        return Outcome(claim, attempt, OutcomeKind.EXHAUSTED)
    return Outcome(claim, attempt, OutcomeKind.RETRY, decision.next_attempt_at)


def decide_http(
    claim: Claim,
    endpoint: Endpoint,
    result: HttpResult,
    *,
    now: float,
    excerpt_bytes: int,
    rng: random.Random | None = None,
) -> Outcome:
    """The outcome of one POST under the endpoint's success rule and schedule."""
    succeeded = result.status_code is not None and endpoint.success.accepts(
        result.status_code, result.body_head
    )
    kept = replace(result, body_head=result.body_head[:excerpt_bytes])
    attempt = attempt_from_result(claim, kept, succeeded)
    return decide_outcome(claim, endpoint, attempt, now=now, rng=rng)
