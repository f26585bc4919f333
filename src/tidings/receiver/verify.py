"""Check a delivery's Standard Webhooks signature before believing a word of it."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tidings.errors import ConfigurationError, SignatureError
from tidings.signing import SECRET_PREFIX

DEFAULT_TOLERANCE_S = 300.0


class MissingHeader(SignatureError):
    """A Standard Webhooks header is missing from the request."""

    code = "missing_signature_header"

    def __init__(self, header: str) -> None:
        super().__init__(
            f"the {header} header is missing or empty; a Tidings delivery carries "
            "webhook-id, webhook-timestamp and webhook-signature"
        )
        self.header = header


class BadTimestamp(SignatureError):
    """The webhook-timestamp header is not whole seconds since the epoch."""

    code = "bad_signature_timestamp"


class TimestampOutOfTolerance(SignatureError):
    """The delivery was signed too far from now."""

    code = "signature_timestamp_out_of_tolerance"


class TimestampTooOld(TimestampOutOfTolerance):
    """The delivery was signed too long ago: replayed, held up, or the clock is behind."""

    code = "signature_timestamp_too_old"


class TimestampTooNew(TimestampOutOfTolerance):
    """The delivery claims to be signed in the future: a clock is ahead."""

    code = "signature_timestamp_too_new"


class NoMatchingSignature(SignatureError):
    """No signature matches any active secret: the body changed or the secret is wrong."""

    code = "no_matching_signature"


@dataclass(frozen=True)
class Verified:
    """A delivery whose signature checked out."""

    id: str
    """The webhook-id: the notification id, the same on every attempt; deduplicate on it."""
    timestamp: int
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def _key(secret: str, index: int) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode("utf-8")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        # Padding is optional in the wild; the decoder ignores any surplus.
        key = base64.b64decode(encoded + "==", validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(
            f"secret #{index + 1} is not a valid whsec_ secret: the part after whsec_ must "
            "be base64"
        ) from exc
    if not key:
        raise ConfigurationError(f"secret #{index + 1} is empty")
    return key


def _secrets(secrets: str | Iterable[str]) -> list[str]:
    # One string is one secret, not a sequence of one-character secrets.
    found = [secrets] if isinstance(secrets, str) else list(secrets)
    if not found:
        raise ConfigurationError("give at least one secret to verify signatures with")
    return found


def _header(lowered: Mapping[str, str], name: str) -> str:
    value = lowered.get(name, "").strip()
    if not value:
        raise MissingHeader(name)
    return value


def _timestamp(value: str, tolerance_s: float, now: float) -> int:
    if not value.isascii() or not value.isdigit():
        raise BadTimestamp(f"webhook-timestamp {value[:40]!r} is not whole seconds since the epoch")
    timestamp = int(value)
    age_s = now - timestamp
    if age_s > tolerance_s:
        raise TimestampTooOld(
            f"webhook-timestamp is {math.ceil(age_s)}s old, more than the {tolerance_s:g}s "
            "tolerance: a replayed or held-up delivery, or this machine's clock is ahead"
        )
    if -age_s > tolerance_s:
        raise TimestampTooNew(
            f"webhook-timestamp is {math.ceil(-age_s)}s in the future, more than the "
            f"{tolerance_s:g}s tolerance: the sender's clock is ahead or this one is behind"
        )
    return timestamp


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def _candidates(header: str) -> list[bytes]:
    """The decoded `v1,` signatures of a header; other versions and junk are skipped."""
    found: list[bytes] = []
    for part in header.split():
        version, _, encoded = part.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secrets: str | Iterable[str],
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Verified:
    """Check a delivery's Standard Webhooks signature and timestamp; raise if either fails.

    `body` is the raw request body, exactly as received. `secrets` is the endpoint's
    secret, or all of its active secrets while one is being rotated: a signature made with
    any of them is accepted. The timestamp must be within `tolerance_s` of `now`.
    """
    keys = [_key(secret, index) for index, secret in enumerate(_secrets(secrets))]
    payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = _header(lowered, "webhook-id")
    stamp = _header(lowered, "webhook-timestamp")
    header = _header(lowered, "webhook-signature")

    timestamp = _timestamp(stamp, tolerance_s, time.time() if now is None else now)

    candidates = _candidates(header)
    for key in keys:
        expected = _signature(key, msg_id, timestamp, payload)
        # Check every candidate: how many comparisons ran must not tell which one matched.
        matched = [hmac.compare_digest(expected, candidate) for candidate in candidates]
        if any(matched):
            return Verified(id=msg_id, timestamp=timestamp, body=payload)
    raise NoMatchingSignature(
        f"none of the {len(candidates)} v1 signature(s) in webhook-signature matches any of "
        f"the {len(keys)} secret(s): the body was changed in transit or by a proxy, or the "
        "secret is not this endpoint's"
    )
