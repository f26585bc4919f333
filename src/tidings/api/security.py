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


def require(*scopes: Scope) -> Callable[[Request], Awaitable[ApiKey]]:
    """A dependency that admits keys of `scopes` (admin always) and returns the key."""
    allowed = {Scope.ADMIN, *scopes}

    async def dependency(request: Request) -> ApiKey:
        credentials: HTTPAuthorizationCredentials | None = await _bearer(request)
        service: Service = request.app.state.service
        if not service.settings.auth_required:
            return _LOCAL_ADMIN
        if credentials is None or not credentials.credentials:
            raise Unauthenticated()
        key = await service.store.key_by_hash(hash_key(credentials.credentials))
        if key is None or key.revoked:
            raise Unauthenticated(
                "the API key is unknown or revoked; ask an operator for a valid key"
            )
        if key.scope not in allowed:
            names = ", ".join(sorted(s.value for s in allowed))
            raise Forbidden(
                f"a {key.scope.value} key may not do this; it needs a key with scope {names}"
            )
        return key

    return dependency
