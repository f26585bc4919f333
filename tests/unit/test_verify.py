"""`tidings.receiver.verify` agrees with the `standardwebhooks` package and names each failure."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from tidings.errors import ConfigurationError, SignatureError
from tidings.receiver import (
    BadTimestamp,
    MissingHeader,
    NoMatchingSignature,
    TimestampOutOfTolerance,
    TimestampTooNew,
    TimestampTooOld,
    Verified,
    verify,
)
from tidings.signing import generate_secret, sign, webhook_headers

MSG_ID = "msg_01hzzzzzzzzzzzzzzzzzzzzzzz"
BODY = '{"recharge_id":"r-1","amount":100,"note":"caf\u00e9 \U0001f600"}'.encode()
STAMP = 1_700_000_000


def _theirs(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Headers as the `standardwebhooks` package signs them."""
    when = datetime.fromtimestamp(timestamp, UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body),
    }


def test_a_signature_made_by_standardwebhooks_verifies_and_returns_id_timestamp_and_body() -> None:
    secret = generate_secret()
    headers = _theirs(secret, MSG_ID, STAMP, BODY)

    verified = verify(BODY, headers, [secret], now=STAMP + 10)

    assert verified == Verified(id=MSG_ID, timestamp=STAMP, body=BODY)
    assert verified.json() == {"recharge_id": "r-1", "amount": 100, "note": "caf\u00e9 \U0001f600"}


def test_headers_made_by_tidings_verify_with_standardwebhooks_for_each_active_secret() -> None:
    old, new = generate_secret(), generate_secret()
    now = int(time.time())  # the package checks against the wall clock
    headers = webhook_headers([old, new], MSG_ID, now, BODY)

    assert len(headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(BODY, headers) == verify(BODY, headers, old).json()
    assert Webhook(new).verify(BODY, headers) == verify(BODY, headers, new).json()


def test_a_body_that_is_not_json_or_utf8_verifies_both_ways() -> None:
    secret = generate_secret()
    body = b"\xff\x00binary\xfe"
    now = int(time.time())

    assert verify(body, _theirs(secret, MSG_ID, now, body), secret).body == body
    Webhook(secret).verify(body, webhook_headers([secret], MSG_ID, now, body), json_parse=False)


def test_several_active_secrets_accept_a_signature_made_with_any_one_of_them() -> None:
    old, new, unrelated = generate_secret(), generate_secret(), generate_secret()
    headers = webhook_headers([old, new], MSG_ID, STAMP, BODY)

    assert verify(BODY, headers, [old], now=STAMP).id == MSG_ID
    assert verify(BODY, headers, [new], now=STAMP).id == MSG_ID
    assert verify(BODY, headers, [unrelated, new], now=STAMP).id == MSG_ID
    with pytest.raises(NoMatchingSignature):
        verify(BODY, headers, [unrelated], now=STAMP)


def test_a_receiver_holding_two_secrets_accepts_a_single_signature_from_the_newer_one() -> None:
    old, new = generate_secret(), generate_secret()
    headers = _theirs(new, MSG_ID, STAMP, BODY)

    assert verify(BODY, headers, [old, new], now=STAMP).timestamp == STAMP


def test_unknown_versions_and_malformed_entries_are_skipped_not_fatal() -> None:
    secret = generate_secret()
    good = sign(secret, MSG_ID, STAMP, BODY)
    header = f"v1a,c2lnbmF0dXJl v2,{good[3:]} v1,!!!not-base64 garbage v1, {good}"

    verified = verify(
        BODY,
        {"webhook-id": MSG_ID, "webhook-timestamp": str(STAMP), "webhook-signature": header},
        secret,
        now=STAMP,
    )

    assert verified.id == MSG_ID


def test_header_names_are_matched_without_regard_to_case() -> None:
    secret = generate_secret()
    headers = {k.title(): v for k, v in webhook_headers([secret], MSG_ID, STAMP, BODY).items()}

    assert "Webhook-Signature" in headers
    assert verify(BODY, headers, secret, now=STAMP).id == MSG_ID


def test_a_str_body_is_verified_as_its_utf8_bytes() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)

    assert verify(BODY.decode(), headers, secret, now=STAMP).body == BODY


def test_an_unpadded_whsec_secret_verifies_like_the_standardwebhooks_package_reads_it() -> None:
    key = bytes(range(25))  # 25 bytes: base64 needs two padding characters
    secret = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    now = int(time.time())
    headers = _theirs(secret, MSG_ID, now, BODY)

    assert verify(BODY, headers, secret).id == MSG_ID
    padded = "whsec_" + base64.b64encode(key).decode()
    assert verify(BODY, headers, padded).id == MSG_ID


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_named_in_the_error(missing: str) -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)
    del headers[missing]

    with pytest.raises(MissingHeader) as raised:
        verify(BODY, headers, secret, now=STAMP)

    assert raised.value.header == missing
    assert raised.value.code == "missing_signature_header"
    assert str(raised.value).startswith(f"the {missing} header is missing or empty")


def test_an_empty_header_counts_as_missing() -> None:
    secret = generate_secret()
    headers = {**webhook_headers([secret], MSG_ID, STAMP, BODY), "webhook-id": "  "}

    with pytest.raises(MissingHeader, match="the webhook-id header is missing or empty"):
        verify(BODY, headers, secret, now=STAMP)


@pytest.mark.parametrize("stamp", ["soon", "1700000000.5", "-1700000000", "1e9", "\u0661\u0662"])
def test_a_timestamp_that_is_not_whole_epoch_seconds_is_a_bad_timestamp(stamp: str) -> None:
    secret = generate_secret()
    headers = {**webhook_headers([secret], MSG_ID, STAMP, BODY), "webhook-timestamp": stamp}

    with pytest.raises(BadTimestamp) as raised:
        verify(BODY, headers, secret, now=STAMP)

    assert str(raised.value) == f"webhook-timestamp {stamp!r} is not whole seconds since the epoch"


def test_a_timestamp_exactly_at_the_tolerance_is_accepted_on_both_sides() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)

    assert verify(BODY, headers, secret, now=STAMP + 300).id == MSG_ID
    assert verify(BODY, headers, secret, now=STAMP - 300).id == MSG_ID


def test_a_timestamp_older_than_five_minutes_is_too_old() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)

    with pytest.raises(TimestampTooOld) as raised:
        verify(BODY, headers, secret, now=STAMP + 301)

    assert isinstance(raised.value, TimestampOutOfTolerance)
    assert str(raised.value).startswith("webhook-timestamp is 301s old, more than the 300s")


def test_a_timestamp_more_than_five_minutes_ahead_is_too_new() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)

    with pytest.raises(TimestampTooNew) as raised:
        verify(BODY, headers, secret, now=STAMP - 301)

    assert str(raised.value).startswith("webhook-timestamp is 301s in the future, more than the")


def test_the_tolerance_can_be_narrowed() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)

    assert verify(BODY, headers, secret, tolerance_s=30, now=STAMP + 30).id == MSG_ID
    with pytest.raises(TimestampTooOld, match="31s old, more than the 30s tolerance"):
        verify(BODY, headers, secret, tolerance_s=30, now=STAMP + 31)


def test_the_timestamp_is_checked_against_the_wall_clock_by_default() -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)  # 2023: long past

    with pytest.raises(TimestampTooOld):
        verify(BODY, headers, secret)


@pytest.mark.parametrize(
    ("part", "value"),
    [
        ("body", BODY + b" "),
        ("webhook-id", "msg_other"),
        ("webhook-timestamp", str(STAMP + 1)),
    ],
)
def test_changing_the_body_id_or_timestamp_breaks_the_signature(part: str, value: object) -> None:
    secret = generate_secret()
    headers = webhook_headers([secret], MSG_ID, STAMP, BODY)
    body = BODY
    if part == "body":
        assert isinstance(value, bytes)
        body = value
    else:
        assert isinstance(value, str)
        headers[part] = value

    with pytest.raises(NoMatchingSignature) as raised:
        verify(body, headers, secret, now=STAMP)

    assert isinstance(raised.value, SignatureError)
    assert raised.value.code == "no_matching_signature"
    assert str(raised.value).startswith(
        "none of the 1 v1 signature(s) in webhook-signature matches any of the 1 secret(s)"
    )


def test_a_raw_secret_without_prefix_is_used_as_its_utf8_bytes() -> None:
    secret = "plain-shared-secret"
    header = sign(secret, MSG_ID, STAMP, BODY)
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(STAMP), "webhook-signature": header}

    assert verify(BODY, headers, secret, now=STAMP).id == MSG_ID


@pytest.mark.parametrize("secrets", [[], "whsec_", "whsec_!!!!"])
def test_no_secret_or_an_unusable_one_is_a_configuration_error(secrets: str | list[str]) -> None:
    headers = webhook_headers([generate_secret()], MSG_ID, STAMP, BODY)

    with pytest.raises(ConfigurationError):
        verify(BODY, headers, secrets, now=STAMP)
