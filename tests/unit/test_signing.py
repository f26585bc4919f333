"""Signatures interoperate with the reference `standardwebhooks` library, both ways."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tidings.signing import (
    SECRET_PREFIX,
    generate_secret,
    secret_key,
    sign,
    signature_header,
    webhook_headers,
)

MSG_ID = "msg_01hzy3c1q9d4b5e6f7g8h9j0k1"
BODY = b'{"recharge_id":"r-1","amount":"10.00","status":"paid"}'


def now_s() -> int:
    """The current time: the reference library refuses timestamps 5 minutes off its clock."""
    return int(time.time())


def test_a_generated_secret_is_whsec_and_24_random_bytes() -> None:
    secrets = {generate_secret() for _ in range(20)}

    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith(SECRET_PREFIX)
        assert len(secret_key(secret)) == 24


def test_a_signature_made_by_tidings_verifies_with_standardwebhooks() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, now_s(), BODY)

    assert Webhook(secret).verify(BODY, headers, json_parse=False) is None
    assert Webhook(secret).verify(BODY, headers) == {
        "recharge_id": "r-1",
        "amount": "10.00",
        "status": "paid",
    }


def test_a_signature_made_by_standardwebhooks_is_the_one_tidings_makes() -> None:
    secret = generate_secret()
    timestamp = now_s()

    theirs = Webhook(secret).sign(MSG_ID, datetime.fromtimestamp(timestamp, UTC), BODY)

    assert theirs == sign(secret, MSG_ID, timestamp, BODY)
    assert theirs.startswith("v1,")


def test_headers_carry_the_id_the_timestamp_and_the_signature() -> None:
    secret = generate_secret()
    timestamp = now_s()

    headers = webhook_headers([secret], MSG_ID, timestamp, BODY)

    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, MSG_ID, timestamp, BODY),
    }


def test_several_secrets_give_space_separated_signatures_that_each_verify() -> None:
    secrets = [generate_secret() for _ in range(3)]
    timestamp = now_s()

    headers = webhook_headers(secrets, MSG_ID, timestamp, BODY)

    parts = headers["webhook-signature"].split(" ")
    assert parts == [sign(secret, MSG_ID, timestamp, BODY) for secret in secrets]
    for secret in secrets:
        Webhook(secret).verify(BODY, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers, json_parse=False)


@pytest.mark.parametrize(
    ("body", "msg_id", "shift_s"),
    [
        (BODY + b" ", MSG_ID, 0),
        (BODY.replace(b"10.00", b"99.00"), MSG_ID, 0),
        (BODY, MSG_ID + "x", 0),
        (BODY, MSG_ID, 1),
    ],
    ids=["body with a byte added", "amount changed", "other id", "other timestamp"],
)
def test_anything_tampered_fails_verification(body: bytes, msg_id: str, shift_s: int) -> None:
    secret = generate_secret()
    timestamp = now_s()
    headers = webhook_headers([secret], MSG_ID, timestamp, BODY)
    tampered = {**headers, "webhook-id": msg_id, "webhook-timestamp": str(timestamp + shift_s)}

    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(body, tampered, json_parse=False)


def test_the_signature_covers_the_exact_bytes_even_when_not_utf8() -> None:
    secret = generate_secret()
    body = b"\xff\x00binary\xfe"
    headers = webhook_headers([secret], MSG_ID, now_s(), body)

    Webhook(secret).verify(body, headers, json_parse=False)


def test_a_secret_without_the_prefix_is_used_as_raw_text() -> None:
    timestamp = now_s()
    expected = hmac.new(b"plain-secret", f"{MSG_ID}.{timestamp}.".encode() + BODY, hashlib.sha256)

    assert secret_key("plain-secret") == b"plain-secret"
    assert sign("plain-secret", MSG_ID, timestamp, BODY) == "v1," + base64.b64encode(
        expected.digest()
    ).decode("ascii")
    # The reference library takes raw key bytes as they are, so it agrees.
    headers = webhook_headers(["plain-secret"], MSG_ID, timestamp, BODY)
    Webhook(b"plain-secret").verify(BODY, headers, json_parse=False)


def test_an_empty_secret_list_gives_an_empty_signature_header() -> None:
    assert signature_header([], MSG_ID, now_s(), BODY) == ""
