"""Request bodies read against a size limit, whether their length is declared or chunked."""

from __future__ import annotations

from starlette.types import Message, Receive

from tidings import errors


class BodyTooLarge(Exception):
    """The body is over the limit: `size` bytes declared, or None when it was chunked."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size

    def describe(self, limit_bytes: int, payload_max_bytes: int) -> str:
        """The 413 message."""
        told = f"{self.size} bytes" if self.size is not None else f"over {limit_bytes} bytes"
        return (
            f"request body is {told}; the payload maximum is {payload_max_bytes} bytes "
            "(TIDINGS_MAX_PAYLOAD_BYTES). Send a smaller payload, e.g. an id the receiver "
            "can look up"
        )


def declared_length(headers: list[tuple[bytes, bytes]] | dict[bytes, bytes]) -> int | None:
    """The Content-Length of a request, if it gives a valid one."""
    pairs = headers.items() if isinstance(headers, dict) else headers
    for name, value in pairs:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


async def read_body(receive: Receive, limit_bytes: int) -> bytes:
    """The whole body, refused as soon as it grows past `limit_bytes`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise errors.InvalidInput("the client went away before sending the whole body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit_bytes:
            raise BodyTooLarge(None)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then whatever the client sends next."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
