"""The HTTP side of an attempt: POST the stored bytes, read a bounded answer, classify it."""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import ssl
import time
from dataclasses import dataclass

import aiohttp

from tidings.errors import BlockedDestination
from tidings.guard import AddressGuard, GuardedResolver, is_blocked_error
from tidings.models import ErrorClass
from tidings.signing import webhook_headers

log = logging.getLogger(__name__)

USER_AGENT = "Tidings/0.1 (+best-effort notification)"
_ERROR_DETAIL_CHARS = 500
_CHECKED_URLS_MAX = 100_000


@dataclass(frozen=True)
class HttpResult:
    """What one POST produced: an answer, or the class of error that stopped it."""

    started_at: float
    duration_ms: float
    status_code: int | None = None
    body_head: bytes = b""
    location: str | None = None
    retry_after_s: float | None = None
    error_class: ErrorClass | None = None
    error_detail: str | None = None


def parse_retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify_error(exc: BaseException) -> ErrorClass:
    """Map an aiohttp/asyncio failure to the error class recorded on the attempt."""
    if is_blocked_error(exc) or isinstance(exc, BlockedDestination):
        return ErrorClass.BLOCKED
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return ErrorClass.TIMEOUT
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ErrorClass.DNS
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return ErrorClass.TLS
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
            return ErrorClass.CONNECT_REFUSED
        if isinstance(os_error, OSError) and os_error.errno in (errno.ETIMEDOUT,):
            return ErrorClass.TIMEOUT
        return ErrorClass.CONNECT_REFUSED
    if isinstance(exc, aiohttp.ClientResponseError):
        # Without raise_for_status, aiohttp raises this only when the answer's head is not
        # HTTP or breaks a limit (too many headers, a line over max_field_size).
        return ErrorClass.INVALID_RESPONSE
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientPayloadError
        | aiohttp.ClientOSError
        | ConnectionResetError,
    ):
        return ErrorClass.CONNECTION_RESET
    return ErrorClass.ERROR


def describe_error(exc: BaseException, timeout_s: float | None = None) -> str:
    """The error detail kept on the attempt: short, whatever the receiver sent."""
    if isinstance(exc, TimeoutError) and not str(exc) and timeout_s is not None:
        return f"TimeoutError: no complete answer within the endpoint timeout ({timeout_s:g}s)"
    if isinstance(exc, aiohttp.ClientResponseError):
        # aiohttp's text carries a made-up status 400 and the offending bytes; keep the gist.
        return f"the answer is not valid HTTP or its head is too large: {exc.message}"[
            :_ERROR_DETAIL_CHARS
        ]
    return f"{type(exc).__name__}: {exc}"[:_ERROR_DETAIL_CHARS]


class HttpSender:
    """Posts notifications over one shared aiohttp session."""

    def __init__(
        self,
        guard: AddressGuard,
        *,
        excerpt_bytes: int = 1024,
        connect_timeout_s: float = 5.0,
        max_connections: int = 256,
        resolver: aiohttp.abc.AbstractResolver | None = None,
    ) -> None:
        self.guard = guard
        self.excerpt_bytes = excerpt_bytes
        self.connect_timeout_s = connect_timeout_s
        self._max_connections = max_connections
        self._inner_resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._checked_urls: set[str] = set()
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        """Open the session; its connector checks every resolved address."""
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            # No per-host cap: endpoints sharing a host are isolated by the dispatcher's
            # per-endpoint slots, which a shared host cap would undo.
            limit_per_host=0,
            resolver=GuardedResolver(self._inner_resolver, self.guard),
            ttl_dns_cache=10,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
            # The receiver's cookies are none of the next receiver's business.
            cookie_jar=aiohttp.DummyCookieJar(),
            max_line_size=8190,
            max_field_size=8190,
        )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self,
        *,
        url: str,
        msg_id: str,
        body: bytes,
        content_type: str,
        secrets: tuple[str, ...],
        timeout_s: float,
        attempt_number: int,
    ) -> HttpResult:
        """One POST of `body` to `url`; never raises for the receiver's failures."""
        if self._session is None:
            raise RuntimeError("HttpSender.start() was not called")
        started_at = time.time()
        clock = time.perf_counter()
        headers = webhook_headers(secrets, msg_id, int(started_at), body)
        headers["Content-Type"] = content_type
        headers["Tidings-Attempt"] = str(attempt_number)
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=timeout_s, sock_connect=min(self.connect_timeout_s, timeout_s)
            )
        try:
            # Literal IP hosts never reach the resolver, so each URL is checked here too;
            # the verdict on a URL never changes while the guard's settings do not.
            if url not in self._checked_urls:
                self.guard.check_url(url)
                if len(self._checked_urls) > _CHECKED_URLS_MAX:
                    self._checked_urls.clear()
                self._checked_urls.add(url)
            async with asyncio.timeout(timeout_s):
                async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False, timeout=timeout
                ) as response:
                    head = await self._read_head(response)
                    if response.content.at_eof():
                        response.release()
                    else:
                        # Stop reading a long answer: close rather than drain it.
                        response.close()
                    return HttpResult(
                        started_at=started_at,
                        duration_ms=(time.perf_counter() - clock) * 1000,
                        status_code=response.status,
                        body_head=head,
                        location=response.headers.get("Location"),
                        retry_after_s=parse_retry_after_s(
                            response.headers.get("Retry-After"), time.time()
                        )
                        if response.status in (429, 503)
                        else None,
                    )
        except (
            aiohttp.ClientError,
            OSError,
            TimeoutError,
            BlockedDestination,
            ssl.SSLError,
        ) as exc:
            return HttpResult(
                started_at=started_at,
                duration_ms=(time.perf_counter() - clock) * 1000,
                error_class=classify_error(exc),
                error_detail=describe_error(exc, timeout_s),
            )

    async def _read_head(self, response: aiohttp.ClientResponse) -> bytes:
        # Read enough for a token rule even when little is kept for the record.
        limit = max(self.excerpt_bytes, 256)
        chunks: list[bytes] = []
        size = 0
        while size < limit:
            chunk = await response.content.read(limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
