"""API keys: who may call the API, and for which topics or endpoints."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from tidings.errors import InvalidInput

KEY_PREFIX = "tdk_"


class Scope(StrEnum):
    """What a key may do."""

    ADMIN = "admin"  # endpoints, keys, everything
    NOTIFIER = "notifier"  # send (and read) notifications on its topics
    RECEIVER = "receiver"  # read, feed and redeliver notifications of its endpoints


@dataclass(frozen=True)
class ApiKey:
    """A stored key: only the hash of the secret part is kept."""

    id: str
    scope: Scope
    key_hash: str
    created_at: float
    name: str = ""
    topics: tuple[str, ...] = ("*",)
    endpoint_ids: tuple[str, ...] = ()
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def may_send(self, topic: str) -> bool:
        """Whether this key may send a notification on `topic`."""
        if self.scope is Scope.ADMIN:
            return True
        return self.scope is Scope.NOTIFIER and ("*" in self.topics or topic in self.topics)


@dataclass(frozen=True)
class NewKey:
    """A key just made: the plain text is shown once and never stored."""

    record: ApiKey
    plain: str = field(repr=False)


def hash_key(plain: str) -> str:
    """The stored form of a key; keys are random enough that a fast hash is safe."""
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


def make_key(
    key_id: str,
    scope: Scope,
    now: float,
    *,
    name: str = "",
    topics: tuple[str, ...] = ("*",),
    endpoint_ids: tuple[str, ...] = (),
) -> NewKey:
    """A fresh key of `scope`; receiver keys must name their endpoints."""
    if scope is Scope.RECEIVER and not endpoint_ids:
        raise InvalidInput(
            "endpoint_ids: a receiver key must name the endpoints whose notifications it may read",
            field="endpoint_ids",
        )
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=key_id,
        scope=scope,
        key_hash=hash_key(plain),
        created_at=now,
        name=name,
        topics=topics if scope is Scope.NOTIFIER else ("*",),
        endpoint_ids=endpoint_ids if scope is Scope.RECEIVER else (),
    )
    return NewKey(record=record, plain=plain)
