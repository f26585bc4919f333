"""POST /v1/notifications as plain ASGI: the one route every notifier calls, kept lean.

The route is still declared on the FastAPI router (for the OpenAPI document); the app of
`create_app` hands it to this door before its own stack. The door does what the framework
would (read the body, check the key, validate with the same pydantic model, map errors to
the same shape) without middleware, routing, dependency solving and request objects, which
were most of a send's cost.
"""

from __future__ import annotations

import json

from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from tidings import errors
from tidings.api.bodies import BodyTooLarge, declared_length, read_body
from tidings.api.errors import answer_for, describe, error_response
from tidings.api.notifications import accept
from tidings.api.schemas import MAX_JSON_DEPTH, NotificationIn
from tidings.api.security import authenticate, bearer_token
from tidings.auth import Scope as KeyScope
from tidings.service import Service

PATH = "/v1/notifications"
_SENDERS = {KeyScope.ADMIN, KeyScope.NOTIFIER}


def opens(scope: Scope) -> bool:
    """Whether the request is one for the door."""
    return bool(scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST")


class SubmitDoor:
    """Answers POST /v1/notifications (see `opens`)."""

    def __init__(self, service: Service, *, limit_bytes: int, payload_max_bytes: int) -> None:
        self.service = service
        self.limit_bytes = limit_bytes
        self.payload_max_bytes = payload_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = dict(scope["headers"])
        try:
            status, content = await self._answer(headers, receive)
        except BodyTooLarge as exc:
            message = exc.describe(self.limit_bytes, self.payload_max_bytes)
            await error_response(413, "payload_too_large", message)(scope, receive, send)
            return
        except Exception as exc:
            await answer_for(exc)(scope, receive, send)
            return
        reply = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": reply})
        await send({"type": "http.response.body", "body": content})

    async def _answer(self, headers: dict[bytes, bytes], receive: Receive) -> tuple[int, bytes]:
        declared = declared_length(headers)
        if declared is not None and declared > self.limit_bytes:
            raise BodyTooLarge(declared)  # refused before a byte of it is read
        key = await authenticate(
            self.service, bearer_token(headers.get(b"authorization", b"").decode()), _SENDERS
        )
        body = await read_body(receive, self.limit_bytes)
        content_type = headers.get(b"content-type", b"application/json").decode().lower()
        media = content_type.partition(";")[0].strip()
        if media != "application/json" and not media.endswith("+json"):
            raise errors.InvalidInput(
                f"the body is sent as {media or 'no media type'}; send JSON with "
                "Content-Type: application/json"
            )
        return await accept(self.service, key, _parse(body))


def _parse(body: bytes) -> NotificationIn:
    """The request, validated; refusals worded as the framework's routes word them."""
    try:
        return NotificationIn.model_validate_json(body)
    except ValidationError as exc:
        if not any(error["type"] == "json_invalid" for error in exc.errors()):
            raise errors.InvalidInput(_problems(exc)) from exc
    # pydantic's parser is stricter than the json module the other routes use (a lone
    # surrogate, NaN): parse as they do, so encode_payload names the problem precisely.
    if not body.strip():
        raise errors.InvalidInput("body: Field required; send a JSON object with topic and payload")
    try:
        document = json.loads(body)
        return NotificationIn.model_validate(document)
    except UnicodeDecodeError as exc:
        raise errors.InvalidInput(
            "the body could not be decoded; send JSON encoded as UTF-8"
        ) from exc
    except json.JSONDecodeError as exc:
        raise errors.InvalidInput(
            f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "send UTF-8 JSON"
        ) from exc
    except ValidationError as exc:
        raise errors.InvalidInput(_problems(exc)) from exc
    except RecursionError as exc:
        raise errors.InvalidInput(
            f"the body is nested too deeply; a payload may be nested {MAX_JSON_DEPTH} levels "
            "deep at most: flatten it or send it as payload_base64"
        ) from exc
    except ValueError as exc:  # an integer of more digits than Python converts
        raise errors.InvalidInput(
            f"the body holds a number too long to read ({exc}); send it as a string"
        ) from exc


def _problems(exc: ValidationError) -> str:
    return "; ".join(describe(dict(error)) for error in exc.errors()[:5])
