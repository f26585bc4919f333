"""Bad input is refused with the right status and a message naming the problem; nothing is kept."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration.harness import (
    TOPIC,
    ReceiverFactory,
    Tidings,
    TidingsFactory,
    attempts_of,
)

MAX_PAYLOAD_BYTES = 256 * 1024


async def _nothing_stored(tidings: Tidings) -> None:
    listed = await tidings.client.get("/v1/notifications")
    assert listed.status_code == 200
    assert listed.json() == {"items": [], "next_cursor": None}
    health = await tidings.client.get("/healthz")
    assert health.json()["deliveries"] == {}


async def _send_payload_text(tidings: Tidings, payload: str) -> httpx.Response:
    """Send a notification whose payload is `payload`, JSON text written by hand."""
    return await tidings.client.post(
        "/v1/notifications",
        content=f'{{"topic": "{TOPIC}", "payload": {payload}}}'.encode(),
        headers={"Content-Type": "application/json"},
    )


def _json_string_of_size(size: int) -> str:
    """A string whose JSON encoding (quotes included) is exactly `size` bytes."""
    return "x" * (size - 2)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {"topic": TOPIC, "payload": _json_string_of_size(MAX_PAYLOAD_BYTES + 1)},
            id="one byte over",
        ),
        pytest.param(
            {"topic": TOPIC, "payload": _json_string_of_size(4 * MAX_PAYLOAD_BYTES)},
            id="far over, refused before it is read",
        ),
        pytest.param(
            {
                "topic": TOPIC,
                "payload_base64": base64.b64encode(b"\0" * (MAX_PAYLOAD_BYTES + 1)).decode(),
                "content_type": "application/octet-stream",
            },
            id="raw bytes one byte over",
        ),
    ],
)
async def test_a_payload_over_the_maximum_is_refused_with_413_and_nothing_is_stored(
    tidings: Tidings, receiver: ReceiverFactory, body: dict[str, Any]
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"))

    answer = await tidings.client.post("/v1/notifications", json=body)

    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == "payload_too_large"
    assert str(MAX_PAYLOAD_BYTES) in answer.json()["message"]
    await _nothing_stored(tidings)
    await tidings.settle()
    assert rx.requests() == []


async def test_a_payload_of_exactly_the_maximum_is_accepted_and_delivered_whole(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    await tidings.add_endpoint(rx.url("/hook"))
    payload = _json_string_of_size(MAX_PAYLOAD_BYTES)

    sent = await tidings.send(payload)
    await tidings.wait_for_status(sent["id"], "delivered")

    [post] = rx.requests("/hook")
    assert len(post.body) == MAX_PAYLOAD_BYTES
    assert post.body == f'"{payload}"'.encode()


async def test_malformed_json_is_refused_with_422(tidings: Tidings) -> None:
    answer = await tidings.client.post(
        "/v1/notifications",
        content=b'{"topic": "recharge.succeeded", "payload": {',
        headers={"Content-Type": "application/json"},
    )

    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_input"
    assert "not valid JSON" in answer.json()["message"]
    await _nothing_stored(tidings)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/notifications", {"topic": 5, "payload": {}}, "topic"),
        ("/v1/notifications", {"payload": {}}, "topic"),
        ("/v1/notifications", {"topic": "has space", "payload": {}}, "topic"),
        ("/v1/notifications", {"topic": TOPIC, "payload": {}, "colour": "red"}, "colour"),
        ("/v1/notifications", {"topic": TOPIC}, "payload"),
        ("/v1/notifications", {"topic": TOPIC, "payload_base64": "%%%"}, "payload_base64"),
        ("/v1/notifications", {"topic": TOPIC, "payload": 1, "key": ""}, "key"),
        ("/v1/endpoints", {"url": "http://127.0.0.1:9/", "topics": TOPIC}, "topics"),
        ("/v1/endpoints", {"url": "http://127.0.0.1:9/", "topics": []}, "topics"),
        ("/v1/endpoints", {"topics": [TOPIC]}, "url"),
        (
            "/v1/endpoints",
            {"url": "http://127.0.0.1:9/", "topics": [TOPIC], "retry_schedule": ["soon"]},
            "retry_schedule",
        ),
        (
            "/v1/endpoints",
            {"url": "http://127.0.0.1:9/", "topics": [TOPIC], "retry_schedule": "weekly"},
            "retry_schedule",
        ),
        (
            "/v1/endpoints",
            {"url": "http://127.0.0.1:9/", "topics": [TOPIC], "window": "0s"},
            "window",
        ),
        (
            "/v1/endpoints",
            {"url": "http://127.0.0.1:9/", "topics": [TOPIC], "success": {"token": " "}},
            "success",
        ),
        (
            "/v1/endpoints",
            {"url": "http://127.0.0.1:9/", "topics": [TOPIC], "timeout": "1h"},
            "timeout",
        ),
        (
            "/v1/endpoints",
            {"url": "http://127.0.0.1:9/", "topics": [TOPIC], "colour": "red"},
            "colour",
        ),
    ],
)
async def test_a_wrong_or_unknown_field_is_refused_with_422_naming_the_field(
    tidings: Tidings, path: str, body: dict[str, Any], field: str
) -> None:
    answer = await tidings.client.post(path, json=body)

    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] in {"invalid_input", "invalid_duration", "invalid_schedule"}
    assert answer.json()["message"].startswith(f"{field}"), answer.json()["message"]
    await _nothing_stored(tidings)
    assert (await tidings.client.get("/v1/endpoints")).json()["items"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=abc", "cursor"),
        ("status=lost", "status"),
        ("created_after=yesterday", "created_after"),
    ],
)
async def test_a_wrong_list_filter_is_refused_with_422_naming_it(
    tidings: Tidings, query: str, field: str
) -> None:
    answer = await tidings.client.get(f"/v1/notifications?{query}")

    assert answer.status_code == 422, answer.text
    named = answer.json()["message"].split(":")[0]
    assert named in (field, f"query.{field}"), answer.json()["message"]


async def test_a_payload_that_is_not_utf8_is_refused_with_422(tidings: Tidings) -> None:
    answer = await tidings.client.post(
        "/v1/notifications",
        content=b'{"topic": "recharge.succeeded", "payload": "caf\xe9 \xff"}',
        headers={"Content-Type": "application/json"},
    )

    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_input"
    assert "UTF-8" in answer.json()["message"]
    await _nothing_stored(tidings)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param('"\\ud800"', id="lone high surrogate"),
        pytest.param('{"name": "x\\udfff"}', id="lone low surrogate in an object"),
        pytest.param('["\\ude00\\ud83d"]', id="a pair in the wrong order"),
    ],
)
async def test_a_lone_surrogate_in_the_payload_is_refused_with_422(
    tidings: Tidings, payload: str
) -> None:
    answer = await _send_payload_text(tidings, payload)

    assert answer.status_code == 422, answer.text
    assert answer.json()["message"].startswith("payload")
    assert "surrogate" in answer.json()["message"]
    await _nothing_stored(tidings)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/notifications/msg_00000000000000000000000000"),
        ("POST", "/v1/notifications/msg_00000000000000000000000000/redeliver"),
        ("GET", "/v1/endpoints/ep_00000000000000000000000000"),
        ("PATCH", "/v1/endpoints/ep_00000000000000000000000000"),
        ("DELETE", "/v1/endpoints/ep_00000000000000000000000000"),
    ],
)
async def test_an_unknown_id_answers_404(tidings: Tidings, method: str, path: str) -> None:
    body = {"description": "x"} if method == "PATCH" else None
    answer = await tidings.client.request(method, path, json=body)

    assert answer.status_code == 404, answer.text
    assert answer.json()["error"] == "not_found"
    assert path.split("/")[3] in answer.json()["message"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.5/", "private"),
        ("http://[::1]/", "loopback"),
        ("http://0x7f000001/", "loopback"),
        ("http://localhost:8080/", "this machine"),
    ],
)
async def test_a_private_url_is_refused_at_registration_with_422_saying_why(
    tidings_factory: TidingsFactory, url: str, reason: str
) -> None:
    tidings = await tidings_factory(allow_private_networks=False)

    answer = await tidings.client.post("/v1/endpoints", json={"url": url, "topics": [TOPIC]})

    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "blocked_destination"
    assert reason in answer.json()["message"]
    assert "TIDINGS_ALLOW_PRIVATE_NETWORKS" in answer.json()["message"]
    assert (await tidings.client.get("/v1/endpoints")).json()["items"] == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "file:///etc/passwd", "127.0.0.1:8080"])
async def test_a_url_that_is_not_http_is_refused_even_on_a_private_network(
    tidings: Tidings, url: str
) -> None:
    answer = await tidings.client.post("/v1/endpoints", json={"url": url, "topics": [TOPIC]})

    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "blocked_destination"
    assert "http" in answer.json()["message"]


async def test_an_endpoint_registered_while_private_networks_were_allowed_is_blocked_at_delivery(
    tidings_factory: TidingsFactory, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    permissive = await tidings_factory()
    await permissive.add_endpoint(rx.url("/hook"), retry_schedule=["1h"])
    await permissive.close()
    guarded = await tidings_factory(allow_private_networks=False)

    sent = await guarded.send({"recharge_id": "r-1"})
    found = await guarded.wait_for_attempts(sent["id"], 1)

    [attempt] = attempts_of(found)
    assert (attempt["error"], attempt["status_code"], attempt["succeeded"]) == (
        "blocked",
        None,
        False,
    )
    assert "loopback" in attempt["error_detail"]
    assert rx.requests() == []


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        pytest.param("9" * 5000, "number too long", id="an integer of 5,000 digits"),
        pytest.param("[" * 5000 + "]" * 5000, "nested too deeply", id="nested 5,000 deep"),
    ],
)
async def test_json_python_cannot_read_is_refused_with_422_naming_the_problem(
    tidings: Tidings, payload: str, named: str
) -> None:
    answer = await _send_payload_text(tidings, payload)

    assert answer.status_code == 422, answer.text
    assert named in answer.json()["message"]
    await _nothing_stored(tidings)


@pytest.mark.parametrize("path", ["/v1/notifications", "/v1/endpoints", "/v1/keys"])
async def test_a_chunked_body_over_the_limit_is_refused_with_413_before_it_is_all_read(
    tidings: Tidings, path: str
) -> None:
    chunk = b"x" * 65536
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(200):  # 12.5 MiB, with no Content-Length
            sent += 1
            yield chunk

    answer = await tidings.client.post(
        path, content=body(), headers={"Content-Type": "application/json"}
    )

    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == "payload_too_large"
    assert str(MAX_PAYLOAD_BYTES) in answer.json()["message"]
    assert sent < 20  # stopped once past the limit (about 375 KiB)
