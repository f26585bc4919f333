"""Who may call which route: a table of route x caller -> status, on a real store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tidings.api.app import create_app
from tidings.auth import Scope
from tidings.service import EndpointSpec, Service
from tidings.settings import Settings


@dataclass
class World:
    """A service with two receivers' endpoints, one notification each, and keys."""

    client: httpx.AsyncClient
    service: Service
    keys: dict[str, str]
    ids: dict[str, str]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}",
        allow_private_networks=True,
    )
    service = Service(settings, run_dispatcher=False)
    await service.start()
    ep_a = await service.add_endpoint(EndpointSpec(url="http://127.0.0.1:9/a", topics=["a"]))
    ep_b = await service.add_endpoint(EndpointSpec(url="http://127.0.0.1:9/b", topics=["b"]))
    from tidings.models import NewNotification

    msg_a, _ = await service.send(NewNotification(topic="a", body=b"{}"))
    msg_b, _ = await service.send(NewNotification(topic="b", body=b"{}"))
    keys = {
        "admin": (await service.create_key(Scope.ADMIN)).plain,
        "notifier_a": (await service.create_key(Scope.NOTIFIER, topics=("a",))).plain,
        "receiver_a": (await service.create_key(Scope.RECEIVER, endpoint_ids=(ep_a.id,))).plain,
    }
    revoked = await service.create_key(Scope.ADMIN)
    await service.store.revoke_key(revoked.record.id, service.clock.now())
    keys["revoked_admin"] = revoked.plain
    keys["unknown"] = "tdk_not-a-key"
    app = create_app(service, manage_lifecycle=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tidings") as client:
        yield World(
            client,
            service,
            keys,
            {"ep_a": ep_a.id, "ep_b": ep_b.id, "msg_a": msg_a.id, "msg_b": msg_b.id},
        )
    await service.stop()


# (method, path template, json body, {caller: expected status}); a caller not listed gets
# the route's default in DEFAULTS below.
ROUTES: list[tuple[str, str, object, dict[str, int]]] = [
    ("GET", "/v1/endpoints", None, {"admin": 200}),
    (
        "POST",
        "/v1/endpoints",
        {"url": "http://127.0.0.1:9/c", "topics": ["c"]},
        {"admin": 201},
    ),
    ("GET", "/v1/endpoints/{ep_a}", None, {"admin": 200, "receiver_a": 200}),
    ("GET", "/v1/endpoints/{ep_b}", None, {"admin": 200, "receiver_a": 404}),
    ("PATCH", "/v1/endpoints/{ep_a}", {"description": "x"}, {"admin": 200}),
    ("POST", "/v1/endpoints/{ep_a}/rotate-secret", {}, {"admin": 200}),
    ("DELETE", "/v1/endpoints/{ep_b}", None, {"admin": 204}),
    (
        "POST",
        "/v1/notifications",
        {"topic": "a", "payload": {"n": 1}},
        {"admin": 201, "notifier_a": 201},
    ),
    ("POST", "/v1/notifications", {"topic": "b", "payload": 1}, {"admin": 201}),
    (
        "GET",
        "/v1/notifications?topic=a",
        None,
        {"admin": 200, "notifier_a": 200, "receiver_a": 200},
    ),
    ("GET", "/v1/notifications?topic=b", None, {"admin": 200, "receiver_a": 200}),
    (
        "GET",
        "/v1/notifications/{msg_a}",
        None,
        {"admin": 200, "notifier_a": 200, "receiver_a": 200},
    ),
    (
        "GET",
        "/v1/notifications/{msg_b}",
        None,
        {"admin": 200, "notifier_a": 404, "receiver_a": 404},
    ),
    (
        "POST",
        "/v1/notifications/{msg_a}/redeliver",
        None,
        {"admin": 200, "receiver_a": 200},
    ),
    ("POST", "/v1/notifications/{msg_b}/redeliver", None, {"admin": 200, "receiver_a": 404}),
    ("GET", "/v1/keys", None, {"admin": 200}),
    ("POST", "/v1/keys", {"scope": "notifier", "topics": ["a"]}, {"admin": 201}),
]
CALLERS = ["none", "unknown", "revoked_admin", "admin", "notifier_a", "receiver_a"]
DEFAULTS = {"none": 401, "unknown": 401, "revoked_admin": 401, "admin": 403}


def _expected(caller: str, table: dict[str, int]) -> int:
    if caller in table:
        return table[caller]
    return DEFAULTS.get(caller, 403)


CASES = [
    pytest.param(
        method, path, body, caller, _expected(caller, table), id=f"{method} {path} {caller}"
    )
    for method, path, body, table in ROUTES
    for caller in CALLERS
]


@pytest.mark.parametrize(("method", "path", "body", "caller", "status"), CASES)
async def test_each_route_admits_exactly_the_right_callers(
    world: World, method: str, path: str, body: object, caller: str, status: int
) -> None:
    headers = {} if caller == "none" else {"Authorization": f"Bearer {world.keys[caller]}"}
    response = await world.client.request(
        method, path.format(**world.ids), json=body, headers=headers
    )
    assert response.status_code == status, response.text
    if status >= 400:
        assert set(response.json()) == {"error", "message"}
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


async def test_a_receiver_key_lists_only_notifications_routed_to_its_endpoints(
    world: World,
) -> None:
    headers = {"Authorization": f"Bearer {world.keys['receiver_a']}"}
    response = await world.client.get("/v1/notifications", headers=headers)
    assert [item["id"] for item in response.json()["items"]] == [world.ids["msg_a"]]


async def test_a_notifier_key_may_not_send_on_another_topic(world: World) -> None:
    headers = {"Authorization": f"Bearer {world.keys['notifier_a']}"}
    response = await world.client.post(
        "/v1/notifications", json={"topic": "b", "payload": 1}, headers=headers
    )
    assert response.status_code == 403
    assert "topic 'b'" in response.json()["message"]


async def test_a_key_revoked_through_the_api_is_refused_at_once(world: World) -> None:
    admin = {"Authorization": f"Bearer {world.keys['admin']}"}
    made = await world.client.post(
        "/v1/keys", json={"scope": "notifier", "topics": ["a"]}, headers=admin
    )
    key_id, plain = made.json()["id"], made.json()["key"]
    mine = {"Authorization": f"Bearer {plain}"}
    sent = await world.client.post(
        "/v1/notifications", json={"topic": "a", "payload": 1}, headers=mine
    )
    assert sent.status_code == 201

    assert (await world.client.delete(f"/v1/keys/{key_id}", headers=admin)).status_code == 204
    again = await world.client.post(
        "/v1/notifications", json={"topic": "a", "payload": 1}, headers=mine
    )
    assert again.status_code == 401


async def test_secrets_and_keys_never_appear_in_listings(world: World) -> None:
    admin = {"Authorization": f"Bearer {world.keys['admin']}"}
    endpoints = (await world.client.get("/v1/endpoints", headers=admin)).json()["items"]
    assert endpoints and all(e["secret"] is None for e in endpoints)
    keys = (await world.client.get("/v1/keys", headers=admin)).json()["items"]
    assert keys and all(k["key"] is None for k in keys)
    stored = await world.service.store.list_keys()
    assert all(world.keys["admin"] not in (k.key_hash, k.name) for k in stored)


async def test_authentication_off_is_refused_unless_bound_to_loopback() -> None:
    from tidings.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"127\.0\.0\.1"):
        Settings(auth_required=False, host="0.0.0.0").check()
    Settings(auth_required=False, host="127.0.0.1").check()
