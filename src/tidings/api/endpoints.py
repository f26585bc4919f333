"""Routes for endpoints: where receivers take deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from tidings.api.schemas import (
    EndpointIn,
    EndpointList,
    EndpointOut,
    EndpointPatch,
    ErrorOut,
    RotateIn,
    TokenRule,
)
from tidings.api.security import require
from tidings.auth import ApiKey, Scope
from tidings.errors import NotFound
from tidings.models import EndpointKind
from tidings.service import EndpointSpec, Service

router = APIRouter(prefix="/v1/endpoints", tags=["endpoints"])
Admin = Annotated[ApiKey, Depends(require())]
AdminOrReceiver = Annotated[ApiKey, Depends(require(Scope.RECEIVER))]
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut},
    403: {"model": ErrorOut},
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _rule(value: TokenRule | str | None) -> object:
    return {"token": value.token} if isinstance(value, TokenRule) else value


@router.post("", status_code=201, response_model=EndpointOut, responses=_ERRORS)
async def add_endpoint(body: EndpointIn, request: Request, _: Admin) -> EndpointOut:
    """Register an endpoint; the answer carries its signing secret, shown only now."""
    spec = EndpointSpec(
        url=body.url,
        kind=EndpointKind(body.kind),
        topics=body.topics,
        secret=body.secret,
        retry_schedule=[str(step) for step in body.retry_schedule]
        if isinstance(body.retry_schedule, list)
        else body.retry_schedule,
        window=body.window,
        success=_rule(body.success),
        timeout=body.timeout,
        description=body.description,
        rate_limit_per_s=body.rate_limit,
        max_in_flight=body.max_in_flight,
    )
    endpoint = await _service(request).add_endpoint(spec)
    return EndpointOut.of(endpoint, with_secret=True)


@router.get("", response_model=EndpointList, responses=_ERRORS)
async def list_endpoints(request: Request, _: Admin) -> EndpointList:
    """Every endpoint, oldest first, without secrets."""
    found = await _service(request).store.list_endpoints()
    return EndpointList(items=[EndpointOut.of(e) for e in found])


@router.get("/{endpoint_id}", response_model=EndpointOut, responses=_ERRORS)
async def get_endpoint(endpoint_id: str, request: Request, key: AdminOrReceiver) -> EndpointOut:
    """One endpoint, without its secret; a receiver key sees only its own."""
    if key.scope is Scope.RECEIVER and endpoint_id not in key.endpoint_ids:
        raise NotFound(f"no endpoint with id {endpoint_id!r}")
    return EndpointOut.of(await _service(request).store.get_endpoint(endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointOut, responses=_ERRORS)
async def change_endpoint(
    endpoint_id: str, body: EndpointPatch, request: Request, _: Admin
) -> EndpointOut:
    """Change some fields of an endpoint."""
    spec = EndpointSpec(
        url=body.url,
        topics=body.topics,
        retry_schedule=[str(step) for step in body.retry_schedule]
        if isinstance(body.retry_schedule, list)
        else body.retry_schedule,
        window=body.window,
        success=_rule(body.success),
        timeout=body.timeout,
        description=body.description,
        enabled=body.enabled,
        rate_limit_per_s=body.rate_limit,
        max_in_flight=body.max_in_flight,
    )
    return EndpointOut.of(await _service(request).change_endpoint(endpoint_id, spec))


@router.delete("/{endpoint_id}", status_code=204, responses=_ERRORS)
async def remove_endpoint(endpoint_id: str, request: Request, _: Admin) -> Response:
    """Remove an endpoint; its unfinished deliveries are cancelled."""
    await _service(request).remove_endpoint(endpoint_id)
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret", response_model=EndpointOut, responses=_ERRORS)
async def rotate_secret(
    endpoint_id: str, body: RotateIn, request: Request, _: Admin
) -> EndpointOut:
    """Sign with a new secret; the old ones keep signing too until the grace period ends."""
    endpoint = await _service(request).rotate_secret(endpoint_id, body.secret, body.grace)
    return EndpointOut.of(endpoint, with_secret=True)
