"""Every attempt carries the same bytes, signed so the `standardwebhooks` package verifies them."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.integration.harness import TOPIC, ReceiverFactory, Reply, Tidings, attempts_of
from tidings.clock import Clock, FakeClock

# Unsorted keys, 1.0 and 1e21, odd whitespace between tokens, an emoji outside the BMP (raw
# and as a surrogate-pair escape), U+2028 (raw and escaped) and a combining mark that NFC
# would fold into one character.
AWKWARD_PAYLOAD = (
    '{ "zeta" :1.0,\t"alpha":\r\n1e21 ,  "emoji": "\U0001f600 \\ud83d\\ude00",'
    '\n"separator": "a\u2028b \\u2028", "accent": "e\u0301", '
    '"nested": {"b": [1, 2.50, -0.0, 1E-7], "a": null, "": true}}'
)


@pytest.fixture
def clock() -> Clock:
    """Time moves only when a test advances it."""
    return FakeClock(time.time())


async def _three_attempts(tidings: Tidings, notification_id: str) -> dict[str, Any]:
    await tidings.wait_for_attempts(notification_id, 1)
    tidings.clock.advance(1.1)
    await tidings.wait_for_attempts(notification_id, 2)
    tidings.clock.advance(1.1)
    return await tidings.wait_for_status(notification_id, "delivered")


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(None, id="generated secret"),
        pytest.param("whsec_" + base64.b64encode(b"a key of the operator").decode(), id="given"),
    ],
)
async def test_an_awkward_json_payload_verifies_on_every_attempt_and_reads_back_the_same(
    tidings: Tidings, receiver: ReceiverFactory, secret: str | None
) -> None:
    rx = await receiver()
    rx.script("/hook", Reply(500), Reply(500), Reply(200))
    fields: dict[str, Any] = {"secret": secret} if secret else {}
    endpoint = await tidings.add_endpoint(rx.url("/hook"), retry_schedule=["1s"], **fields)
    assert endpoint["secret"].startswith("whsec_")
    assert secret is None or endpoint["secret"] == secret
    envelope = f'{{"topic": "{TOPIC}", "payload": {AWKWARD_PAYLOAD}}}'.encode()
    answer = await tidings.client.post(
        "/v1/notifications", content=envelope, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 201, answer.text
    sent = answer.json()
    expected = json.loads(AWKWARD_PAYLOAD)

    done = await _three_attempts(tidings, sent["id"])

    posts = rx.requests("/hook")
    assert len(posts) == 3
    assert len({p.body for p in posts}) == 1, "every attempt carries byte-identical bodies"
    for post in posts:
        assert post.webhook_id == sent["id"]
        assert post.headers["content-type"] == "application/json"
        verified = Webhook(endpoint["secret"]).verify(post.body, post.headers)
        assert verified == expected
        assert list(verified) == ["zeta", "alpha", "emoji", "separator", "accent", "nested"]
        assert isinstance(verified["zeta"], float) and isinstance(verified["alpha"], float)
        assert verified["emoji"] == "\U0001f600 \U0001f600"
        assert verified["separator"] == "a\u2028b \u2028"
        assert verified["accent"] == "e\u0301", "combining marks are not normalised"
    assert done["payload"] == expected
    assert list(done["payload"]) == list(expected)
    assert done["content_type"] == "application/json"
    assert json.loads(posts[0].body) == done["payload"]
    assert [a["status_code"] for a in attempts_of(done)] == [500, 500, 200]


async def test_a_tampered_body_does_not_verify(tidings: Tidings, receiver: ReceiverFactory) -> None:
    rx = await receiver()
    endpoint = await tidings.add_endpoint(rx.url("/hook"))
    sent = await tidings.send({"amount": 100})
    await tidings.wait_for_status(sent["id"], "delivered")

    [post] = rx.requests("/hook")
    Webhook(endpoint["secret"]).verify(post.body, post.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint["secret"]).verify(post.body.replace(b"100", b"900"), post.headers)


async def test_raw_bytes_sent_as_base64_arrive_unchanged_and_signed(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    endpoint = await tidings.add_endpoint(rx.url("/hook"))
    raw = b"\x00\xff\xfe not UTF-8 \r\n\x80 <xml/>"
    answer = await tidings.client.post(
        "/v1/notifications",
        json={
            "topic": TOPIC,
            "payload_base64": base64.b64encode(raw).decode(),
            "content_type": "application/x-recharge",
        },
    )
    assert answer.status_code == 201, answer.text
    sent = answer.json()

    done = await tidings.wait_for_status(sent["id"], "delivered")

    [post] = rx.requests("/hook")
    assert post.body == raw
    assert post.headers["content-type"] == "application/x-recharge"
    Webhook(endpoint["secret"]).verify(post.body, post.headers, json_parse=False)
    assert base64.b64decode(done["payload_base64"]) == raw
    assert (done["payload"], done["content_type"]) == (None, "application/x-recharge")


async def test_a_secret_without_the_whsec_prefix_is_refused_with_the_form_to_use(
    tidings: Tidings, receiver: ReceiverFactory
) -> None:
    rx = await receiver()
    response = await tidings.client.post(
        "/v1/endpoints",
        json={"url": rx.url("/hook"), "topics": ["t"], "secret": "c2VjcmV0LWtleS1ieXRlcw=="},
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_input"
    assert response.json()["message"].startswith("secret: ")
    assert "whsec_" in response.json()["message"]
    listed = await tidings.client.get("/v1/endpoints")
    assert listed.json()["items"] == []
