"""Who is calling: the API key in `Authorization: Bearer`, checked against its scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tidings.auth import ApiKey, Scope, hash_key
from tidings.errors import Forbidden, Unauthenticated
from tidings.service import Service

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tdk_...`")

# Stands for the caller when authentication is off (loopback only; see Settings.check).
_LOCAL_ADMIN = ApiKey(id="local", scope=Scope.ADMIN, key_hash="", created_at=0.0, name="local")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def authenticate(service: Service, token: str | None, allowed: set[Scope]) -> ApiKey:
    """The key behind `token` if it may act with one of `allowed`; raises otherwise."""
    if not service.settings.auth_required:
        return _LOCAL_ADMIN
    if not token:
        raise Unauthenticated()
    key = await service.key_by_hash(hash_key(token))
    if key is None or key.revoked:
        raise Unauthenticated("the API key is unknown or revoked; ask an operator for a valid key")
    if key.scope not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        raise Forbidden(
            f"a {key.scope.value} key may not do this; it needs a key with scope {names}"
        )
    return key


def require(*scopes: Scope) -> Callable[[Request], Awaitable[ApiKey]]:
    """A dependency that admits keys of `scopes` (admin always) and returns the key."""
    allowed = {Scope.ADMIN, *scopes}

    async def dependency(request: Request) -> ApiKey:
        credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
        service: Service = request.app.state.service
        token = credentials.credentials if credentials else None
        return await authenticate(service, token, allowed)

    return dependency
