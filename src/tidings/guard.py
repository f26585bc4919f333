"""Keep deliveries away from loopback, private and metadata addresses (SSRF guard)."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import TypeAlias

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from tidings.errors import BlockedDestination

__all__ = [
    "AddressGuard",
    "BlockedAddressError",
    "GuardedResolver",
    "IPAddress",
    "find_blocked_error",
    "is_blocked_error",
    "is_public_address",
    "parse_numeric_host",
]

logger = logging.getLogger(__name__)

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
"""An IPv4 or IPv6 address."""

ALLOWED_SCHEMES = frozenset({"http", "https"})
"""The URL schemes a delivery may use."""

_PRIVATE_HINT = "or set TIDINGS_ALLOW_PRIVATE_NETWORKS=true for local development"

# The same part syntax as C's strtoul(base=0), which inet_aton uses: 0x hex, leading-0 octal,
# else decimal. Only ASCII digits count, as C's isdigit() in the C locale.
_HEX_PART = re.compile(r"0[xX][0-9a-fA-F]+")
_OCTAL_PART = re.compile(r"0[0-7]*")
_DECIMAL_PART = re.compile(r"[1-9][0-9]*")
_C_WHITESPACE = " \t\n\v\f\r"

# After yarl has IDNA-encoded a name it is plain ASCII; anything else (spaces, '%', control
# characters) is a host that some resolver may read differently from us.
_HOST_NAME = re.compile(r"[a-z0-9_.-]+", re.IGNORECASE)
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")

_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(ip: IPAddress) -> bool:
    """Tell whether a delivery may connect to this address."""
    return _why_not_public(ip) is None


def parse_numeric_host(host: str) -> IPAddress | None:
    """Read a host the way the C resolver would if it is numeric; None for a host name."""
    if host.startswith("[") and host.endswith("]"):
        return _parse_ipv6(host[1:-1])

    if ":" in host:
        return _parse_ipv6(host)

    return _parse_inet_aton(host)


class AddressGuard:
    """Decides which delivery URLs and resolved addresses may be connected to."""

    def __init__(
        self, *, allow_private: bool = False, allowed_ports: frozenset[int] | None = None
    ) -> None:
        self.allow_private = allow_private
        self.allowed_ports = allowed_ports

    def check_url(self, url: str) -> None:
        """Raise BlockedDestination unless the URL may be delivered to.

        Host names are not resolved here: a name may point elsewhere by the time of
        delivery, so `GuardedResolver` checks the resolved addresses at connect time.
        """
        try:
            parsed = URL(url)
        except ValueError as exc:
            raise BlockedDestination(
                f"the URL cannot be parsed ({exc}); give a full http:// or https:// URL"
            ) from exc

        self._check_scheme(parsed.scheme)
        host = parsed.raw_host
        if not host:
            raise BlockedDestination(
                "the URL has no host; write it as http://host/path or https://host/path"
            )

        self._check_port(parsed.port)
        numeric = self._check_host_syntax(host)
        if self.allow_private:
            return

        if numeric is not None:
            reason = _why_not_public(numeric)
            if reason is not None:
                raise BlockedDestination(
                    f"host {host!r} is the address {numeric}, which is {reason}; "
                    f"use a public address, {_PRIVATE_HINT}"
                )
            return

        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(_LOCAL_SUFFIXES):
            raise BlockedDestination(
                f"host {host!r} names this machine or a local network; "
                f"use a public host name, {_PRIVATE_HINT}"
            )

    def check_address(self, host: str, ip: str) -> None:
        """Raise BlockedDestination if `host` resolved to an address deliveries may not reach."""
        if self.allow_private:
            return

        try:
            address = ipaddress.ip_address(ip)
        except ValueError as exc:
            # Fail closed: an address we cannot read is one we cannot vouch for.
            raise BlockedDestination(
                f"host {host!r} resolved to {ip!r}, which is not an IP address; "
                "check the receiver's DNS records"
            ) from exc

        reason = _why_not_public(address)
        if reason is not None:
            raise BlockedDestination(
                f"host {host!r} resolved to {address}, which is {reason}; "
                f"point its DNS at a public address, {_PRIVATE_HINT}"
            )

    def _check_scheme(self, scheme: str) -> None:
        if scheme not in ALLOWED_SCHEMES:
            shown = f"{scheme!r}" if scheme else "missing"
            raise BlockedDestination(f"the URL scheme is {shown}; use an http:// or https:// URL")

    def _check_port(self, port: int | None) -> None:
        if port == 0:
            raise BlockedDestination("port 0 cannot be connected to; give the receiver's port")

        if self.allowed_ports is not None and port not in self.allowed_ports:
            allowed = ", ".join(str(p) for p in sorted(self.allowed_ports)) or "none"
            raise BlockedDestination(
                f"port {port} is not allowed; use one of the allowed ports ({allowed})"
            )

    def _check_host_syntax(self, host: str) -> IPAddress | None:
        if ":" in host:
            address = parse_numeric_host(host)
            if address is None:
                raise BlockedDestination(
                    f"host {host!r} is not a valid IPv6 address; write it as [2001:db8::1]"
                )
            return address

        if not _HOST_NAME.fullmatch(host):
            raise BlockedDestination(
                f"host {host!r} is not a valid host name; "
                "use only letters, digits, '-', '_' and '.'"
            )

        # The C resolver rejects a trailing dot on a number, but a DNS server might still
        # answer for it; judging it as the number is the cautious reading.
        return parse_numeric_host(host.rstrip("."))


class BlockedAddressError(OSError):
    """Every address a host resolved to was refused by the guard."""

    def __init__(self, host: str, refused: list[str], reason: str) -> None:
        # No errno: nothing failed in the OS, and a made-up one would mislead retry logic.
        super().__init__(None, reason)
        self.host = host
        self.refused = refused
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class GuardedResolver(AbstractResolver):
    """Resolves through another resolver and drops the addresses the guard refuses.

    aiohttp only wraps what a resolver raises: a blocked request fails in
    `session.post` with `aiohttp.ClientConnectorDNSError` whose `os_error` and
    `__cause__` are the `BlockedAddressError`; use `is_blocked_error` to recognise it.

    aiohttp never calls the resolver for a literal IP host (all digits and dots, or
    containing ':'), so the sender must also call `AddressGuard.check_url` before every
    attempt. Numeric spellings with letters, such as 0x7f000001, do reach the resolver.

    Without an inner resolver, aiohttp's `DefaultResolver` is made, which needs a running
    event loop; only that one is closed by `close`.
    """

    # Limitation: through an HTTP proxy aiohttp resolves only the proxy's host, so the
    # target's addresses are not checked at connect time; deliveries must not use proxies.

    def __init__(
        self, inner: AbstractResolver | None = None, guard: AddressGuard | None = None
    ) -> None:
        self._owns_inner = inner is None
        self._inner: AbstractResolver = inner if inner is not None else DefaultResolver()
        self._guard = guard if guard is not None else AddressGuard()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host` and keep only the addresses the guard allows."""
        kept: list[ResolveResult] = []
        refused: list[str] = []
        last_reason = ""
        for result in await self._inner.resolve(host, port, family):
            try:
                self._guard.check_address(host, result["host"])
            except BlockedDestination as exc:
                refused.append(result["host"])
                last_reason = exc.message
            else:
                kept.append(result)

        if refused and not kept:
            raise BlockedAddressError(host, refused, last_reason)

        if refused:
            logger.warning(
                "host %s resolved to refused addresses %s; delivering to the others",
                host,
                ", ".join(refused),
                extra={"action": "address_refused", "endpoint": host, "refused": refused},
            )
        return kept

    async def close(self) -> None:
        """Close the inner resolver if this resolver made it."""
        if self._owns_inner:
            await self._inner.close()


def find_blocked_error(exc: BaseException) -> BlockedAddressError | BlockedDestination | None:
    """Find the guard's refusal in an exception or in what caused it."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))

        if isinstance(current, BlockedAddressError | BlockedDestination):
            return current

        # aiohttp keeps the resolver's error in `os_error` as well as in `__cause__`.
        linked = [current.__cause__, current.__context__, getattr(current, "os_error", None)]
        pending.extend(e for e in linked if isinstance(e, BaseException))
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
    return None


def is_blocked_error(exc: BaseException) -> bool:
    """Tell whether a failed request was refused by the guard rather than by the network."""
    return find_blocked_error(exc) is not None


def _why_not_public(ip: IPAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded:
            # These addresses reach the embedded IPv4 host, so that host is what counts.
            for inner in embedded:
                reason = _why_not_public(inner)
                if reason is not None:
                    return f"a wrapper around {inner}, which is {reason}"
            return None

    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (this includes cloud metadata at 169.254.169.254)"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if ip in _SHARED_ADDRESS_SPACE:
        return "carrier-grade NAT space"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private or special-purpose"
    if not ip.is_global:
        return "not globally reachable"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if ip in _NAT64_WELL_KNOWN:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    return []


def _parse_ipv6(text: str) -> ipaddress.IPv6Address | None:
    # A zone id in a URL is percent-encoded as %25 (RFC 6874).
    try:
        return ipaddress.IPv6Address(text.replace("%25", "%", 1))
    except ValueError:
        return None


def _parse_inet_aton(host: str) -> ipaddress.IPv4Address | None:
    # inet_aton stops reading at the first whitespace and ignores the rest.
    for index, char in enumerate(host):
        if char in _C_WHITESPACE:
            host = host[:index]
            break

    parts = host.split(".")
    if not host or len(parts) > 4:
        return None

    values: list[int] = []
    for part in parts:
        value = _parse_c_number(part)
        if value is None:
            return None
        values.append(value)

    # a, a.b, a.b.c, a.b.c.d: every part but the last is one byte, the last fills the rest.
    *leading, last = values
    last_bits = 32 - 8 * len(leading)
    if any(v > 0xFF for v in leading) or last >= 1 << last_bits:
        return None

    number = last
    for position, value in enumerate(leading):
        number |= value << (24 - 8 * position)
    return ipaddress.IPv4Address(number)


def _parse_c_number(part: str) -> int | None:
    if _HEX_PART.fullmatch(part):
        return int(part[2:], 16)
    if _OCTAL_PART.fullmatch(part):
        return int(part, 8)
    # More than ten decimal digits is over 32 bits anyway, and int() refuses very long ones.
    if _DECIMAL_PART.fullmatch(part) and len(part) <= 10:
        return int(part, 10)
    return None
