"""The notifications every system sends: the same bodies, to the same endpoints, in order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Item:
    """One notification of a run: its bench id, endpoint index, topic, payload and bytes."""

    index: int
    bench_id: str
    endpoint: int
    payload: dict[str, Any]
    body: bytes

    @property
    def topic(self) -> str:
        """The topic only this item's endpoint takes."""
        return topic_of(self.endpoint)


def topic_of(endpoint: int) -> str:
    """One topic per endpoint, so a notification makes exactly one delivery."""
    return f"bench.e{endpoint:02d}"


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes Tidings stores for a JSON payload (compact, UTF-8), used by every system."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def make_payload(tag: str, index: int, payload_bytes: int) -> dict[str, Any]:
    """A recharge result padded to about `payload_bytes` once encoded."""
    payload: dict[str, Any] = {
        "recharge_id": f"r-{tag}-{index}",
        "account": f"acct-{index % 5000:05d}",
        "amount_cents": 1000 + index % 9000,
        "currency": "CNY",
        "status": "succeeded",
        "pad": "",
    }
    room = payload_bytes - len(encode(payload))
    payload["pad"] = "x" * max(room, 0)
    return payload


def make_items(tag: str, count: int, endpoints: int, payload_bytes: int) -> list[Item]:
    """`count` items spread round-robin over `endpoints` endpoints."""
    items = []
    for index in range(count):
        payload = make_payload(tag, index, payload_bytes)
        items.append(
            Item(
                index=index,
                bench_id=f"{tag}-{index}",
                endpoint=index % endpoints,
                payload=payload,
                body=encode(payload),
            )
        )
    return items
