"""Fuzz the API with schemathesis against the OpenAPI document it serves.

Every operation gets a bounded number of generated requests, valid and invalid, sent with an
admin key to the app in this process; no answer may be a 5xx, and every answer must match
the document (status codes, content types, bodies). The run is derandomized: CI sees the
same requests on every run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import httpx
import pytest
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import Case

from tidings.api.app import create_app
from tidings.auth import Scope
from tidings.models import Attempt, NewNotification, Outcome, OutcomeKind
from tidings.service import EndpointSpec, Service
from tidings.settings import Settings

BASE_URL: Final = "http://testserver"
EXAMPLES_PER_OPERATION: Final = 40
TOPIC: Final = "recharge.succeeded"

# Built at import, without starting: schemathesis makes one test per operation from the
# document when the module is collected. No dispatcher runs, because a fuzzed endpoint URL
# may name any host: nothing is ever sent anywhere.
SERVICE: Final = Service(
    Settings(database_url="sqlite+aiosqlite:///:memory:", auth_required=True, host="127.0.0.1"),
    run_dispatcher=False,
)
APP: Final = create_app(SERVICE, manage_lifecycle=False)
DOCUMENT: Final = APP.openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@dataclass
class Served:
    """The app behind an httpx client on an event loop of its own, the admin header, and
    the ids of what was there before the fuzzing began."""

    portal: BlockingPortal
    client: httpx.AsyncClient
    admin: dict[str, str]
    ids: dict[str, str]

    def request(self, **kwargs: Any) -> httpx.Response:
        """Send one request from this (synchronous) test through the app's loop."""
        return self.portal.call(partial(self.client.request, **kwargs))


@pytest.fixture(scope="module", autouse=True)
def hypothesis_storage() -> Iterator[None]:
    """Keep Hypothesis' caches in a temporary directory, not in `.hypothesis/` here."""
    with tempfile.TemporaryDirectory(prefix="tidings-fuzz-") as directory:
        set_hypothesis_home_dir(directory)
        try:
            yield
        finally:
            # Back to the default: HYPOTHESIS_STORAGE_DIRECTORY, else ./.hypothesis.
            set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """The API with authentication on, over an in-memory store: nothing is left on disk."""

    async def start() -> tuple[httpx.AsyncClient, str, dict[str, str]]:
        await SERVICE.start()
        key = await SERVICE.create_key(Scope.ADMIN, name="fuzzer")
        ids = await _seed(SERVICE)
        ids["key"] = key.record.id
        transport = httpx.ASGITransport(app=APP)
        return httpx.AsyncClient(transport=transport, base_url=BASE_URL), key.plain, ids

    # Hypothesis drives synchronous tests, so the service runs on an event loop in a thread
    # of its own, and every request goes through that loop.
    with start_blocking_portal() as portal:
        client, key, ids = portal.call(start)
        try:
            yield Served(portal, client, {"Authorization": f"Bearer {key}"}, ids)
        finally:
            portal.call(client.aclose)
            portal.call(SERVICE.stop)


async def _seed(service: Service) -> dict[str, str]:
    """An endpoint, a notification with one failed attempt (answers with every field), and
    a key to revoke."""
    endpoint = await service.add_endpoint(
        EndpointSpec(url="https://receiver.example/notify", topics=[TOPIC])
    )
    notification, _ = await service.send(NewNotification(topic=TOPIC, body=b'{"amount":100}'))
    now = service.clock.now()
    [claim] = await service.store.claim_due(now=now, limit=1, lease_s=60.0, owner="fuzz-seed")
    attempt = Attempt(
        delivery_id=claim.delivery_id,
        number=claim.attempt_number,
        started_at=now,
        duration_ms=12.5,
        succeeded=False,
        status_code=503,
        response_excerpt=b"busy \xff\xfe",  # not UTF-8: shown with replacement characters
        retry_after_s=30.0,
    )
    await service.store.record_outcomes(
        [Outcome(claim, attempt, OutcomeKind.RETRY, now + 60.0)], now
    )
    revocable = await service.create_key(Scope.NOTIFIER, name="to revoke")
    return {
        "endpoint_id": endpoint.id,
        "notification_id": notification.id,
        "revocable": revocable.record.id,
    }


def test_the_fuzzed_document_is_the_one_the_api_serves(served: Served) -> None:
    response = served.request(method="GET", url="/openapi.json")

    assert response.status_code == 200
    assert response.json() == DOCUMENT


def _request_kwargs(case: Case[Any], headers: dict[str, str]) -> dict[str, Any]:
    """The generated request as keyword arguments of an httpx client's `request`."""
    kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=headers)
    cookies = kwargs.pop("cookies", None)
    if cookies:
        kwargs["headers"]["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    if "data" in kwargs and isinstance(kwargs["data"], bytes | str):
        kwargs["content"] = kwargs.pop("data")
    return kwargs


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_5xx_or_an_answer_outside_the_document(
    case: Case[Any], served: Served
) -> None:
    kwargs = _request_kwargs(case, served.admin)

    response = served.request(**kwargs)

    case.validate_response(
        response,
        headers=served.admin,
        transport_kwargs=kwargs,
        # Limitation: the API checks more than its document can say (the address guard on
        # endpoint URLs, the syntax of durations and topics, times in queries), so a
        # request the document allows may still get a 422; that answer is documented and
        # checked like any other, but it is not counted as a failure.
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )


# (path, method, path parameters, body): requests on what exists, which the generated ones
# rarely name, so the documented shapes of successful answers are checked too.
ON_SEEDED: Final[list[tuple[str, str, dict[str, str], Any]]] = [
    ("/v1/endpoints/{endpoint_id}", "GET", {"endpoint_id": "endpoint_id"}, None),
    ("/v1/endpoints/{endpoint_id}", "PATCH", {"endpoint_id": "endpoint_id"}, {"enabled": False}),
    ("/v1/endpoints/{endpoint_id}/rotate-secret", "POST", {"endpoint_id": "endpoint_id"}, {}),
    ("/v1/notifications/{notification_id}", "GET", {"notification_id": "notification_id"}, None),
    (
        "/v1/notifications/{notification_id}/redeliver",
        "POST",
        {"notification_id": "notification_id"},
        None,
    ),
    ("/v1/notifications", "GET", {}, None),
    ("/v1/keys/{key_id}", "DELETE", {"key_id": "revocable"}, None),
]


@pytest.mark.parametrize(
    ("path", "method", "parameters", "body"),
    ON_SEEDED,
    ids=[f"{method} {path}" for path, method, _, _ in ON_SEEDED],
)
def test_answers_about_existing_resources_match_the_document(
    served: Served, path: str, method: str, parameters: dict[str, str], body: Any
) -> None:
    case = schema[path][method].Case(
        path_parameters={name: served.ids[seeded] for name, seeded in parameters.items()},
        **({} if body is None else {"body": body, "media_type": "application/json"}),
    )
    kwargs = _request_kwargs(case, served.admin)

    response = served.request(**kwargs)

    assert response.status_code < 300, response.text
    case.validate_response(response, headers=served.admin, transport_kwargs=kwargs)
