"""Routes for API keys (admin only); a key's plain text is shown when it is made."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from tidings.api.schemas import ErrorOut, iso
from tidings.api.security import require
from tidings.auth import ApiKey, Scope
from tidings.service import Service

router = APIRouter(prefix="/v1/keys", tags=["keys"])
Admin = Annotated[ApiKey, Depends(require())]
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    403: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


class KeyIn(BaseModel):
    """A key to make: its scope, and the topics (notifier) or endpoints (receiver)."""

    model_config = ConfigDict(extra="forbid")

    scope: Scope
    name: str = Field(default="", max_length=200)
    topics: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=100)
    endpoint_ids: list[str] = Field(default_factory=list, max_length=100)


class KeyOut(BaseModel):
    """A key as listed; `key` only in the answer that made it."""

    id: str
    scope: str
    name: str
    topics: list[str]
    endpoint_ids: list[str]
    created_at: str
    revoked_at: str | None
    key: str | None = None

    @classmethod
    def of(cls, record: ApiKey, plain: str | None = None) -> KeyOut:
        return cls(
            id=record.id,
            scope=record.scope.value,
            name=record.name,
            topics=list(record.topics),
            endpoint_ids=list(record.endpoint_ids),
            created_at=iso(record.created_at) or "",
            revoked_at=iso(record.revoked_at),
            key=plain,
        )


class KeyList(BaseModel):
    """Every key, without secrets."""

    items: list[KeyOut]


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


@router.post("", status_code=201, response_model=KeyOut, responses=_ERRORS)
async def create_key(body: KeyIn, request: Request, _: Admin) -> KeyOut:
    """Make a key; the answer holds its plain text, shown only now."""
    made = await _service(request).create_key(
        body.scope, name=body.name, topics=tuple(body.topics), endpoint_ids=tuple(body.endpoint_ids)
    )
    return KeyOut.of(made.record, made.plain)


@router.get("", response_model=KeyList, responses=_ERRORS)
async def list_keys(request: Request, _: Admin) -> KeyList:
    """Every key, without its plain text."""
    return KeyList(items=[KeyOut.of(k) for k in await _service(request).store.list_keys()])


@router.delete("/{key_id}", status_code=204, responses=_ERRORS)
async def revoke_key(key_id: str, request: Request, _: Admin) -> Response:
    """Revoke a key at once."""
    await _service(request).revoke_key(key_id)
    return Response(status_code=204)
