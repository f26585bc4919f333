"""The address guard refuses private destinations at registration and at connect time."""

from __future__ import annotations

import ipaddress
import logging
import platform
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.errors import BlockedDestination
from tidings.guard import (
    AddressGuard,
    BlockedAddressError,
    GuardedResolver,
    find_blocked_error,
    is_blocked_error,
    is_public_address,
    parse_numeric_host,
)

PRIVATE_URLS = [
    pytest.param("http://169.254.169.254/latest/meta-data", id="cloud metadata"),
    pytest.param("http://10.0.0.5/", id="private 10/8"),
    pytest.param("http://[::1]/", id="IPv6 loopback"),
    pytest.param("http://0x7f000001/", id="hex loopback"),
    pytest.param("http://127.1/", id="short loopback"),
    pytest.param("http://0177.0.0.1/", id="octal loopback"),
    pytest.param("http://2130706433/", id="decimal loopback"),
    pytest.param("http://0.0.0.0/", id="unspecified"),
    pytest.param("http://[::ffff:127.0.0.1]/", id="IPv4-mapped loopback"),
    pytest.param("http://localhost./", id="localhost with a trailing dot"),
    pytest.param("http://foo.localhost/", id="subdomain of localhost"),
    pytest.param("http://127.0.0.1./", id="loopback with a trailing dot"),
    pytest.param("http://[fe80::1%25eth0]:8080/", id="link-local with a zone"),
    pytest.param("http://printer.local/", id="mDNS name"),
    pytest.param("http://db.internal/", id="internal name"),
]

TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass
class FakeResolver(AbstractResolver):
    """Answers from a table that a test may change between lookups."""

    addresses: dict[str, list[str]]
    calls: list[str] = field(default_factory=list)
    closed: bool = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        if host not in self.addresses:
            raise OSError(None, f"no such host {host}")
        return [_result(host, ip, port) for ip in self.addresses[host]]

    async def close(self) -> None:
        self.closed = True


@dataclass
class Receiver:
    """A webhook receiver on loopback that counts the deliveries it got."""

    port: int
    paths: list[str] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    runner = web.AppRunner(app)
    received = Receiver(port=0)

    async def take(request: web.Request) -> web.Response:
        received.paths.append(request.path)
        return web.Response(status=204)

    app.router.add_post("/", take)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    received.port = runner.addresses[0][1]
    yield received
    await runner.cleanup()


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_a_private_destination_is_refused(url: str) -> None:
    with pytest.raises(BlockedDestination):
        AddressGuard().check_url(url)


def test_metadata_address_is_refused_with_a_message_that_says_why_and_what_to_do() -> None:
    with pytest.raises(BlockedDestination) as caught:
        AddressGuard().check_url("http://169.254.169.254/latest/meta-data")

    assert "169.254.169.254" in caught.value.message
    assert "link-local" in caught.value.message
    assert "TIDINGS_ALLOW_PRIVATE_NETWORKS=true" in caught.value.message


def test_a_numeric_spelling_is_reported_as_the_address_it_means() -> None:
    with pytest.raises(BlockedDestination, match=r"'0x7f000001' is the address 127\.0\.0\.1"):
        AddressGuard().check_url("http://0x7f000001/")


def test_a_mapped_ipv6_address_is_judged_by_its_ipv4_address() -> None:
    with pytest.raises(BlockedDestination, match=r"127\.0\.0\.1, which is loopback"):
        AddressGuard().check_url("http://[::ffff:127.0.0.1]/")


def test_a_scheme_other_than_http_or_https_is_refused() -> None:
    with pytest.raises(BlockedDestination, match=r"scheme is 'ftp'; use an http:// or https://"):
        AddressGuard().check_url("ftp://example.com/")


def test_a_url_without_a_host_is_refused() -> None:
    with pytest.raises(BlockedDestination, match="has no host"):
        AddressGuard().check_url("http:///nopath")


def test_a_relative_url_is_refused_for_its_missing_scheme() -> None:
    with pytest.raises(BlockedDestination, match="scheme is missing"):
        AddressGuard().check_url("example.com/hook")


def test_a_url_that_cannot_be_parsed_is_refused() -> None:
    with pytest.raises(BlockedDestination, match="cannot be parsed"):
        AddressGuard().check_url("http://example.com:99999/")


@pytest.mark.parametrize("url", ["http://exa mple.com/", "http://127.0.0.1%09/"])
def test_a_host_with_characters_no_host_name_has_is_refused(url: str) -> None:
    with pytest.raises(BlockedDestination, match="not a valid host name"):
        AddressGuard(allow_private=True).check_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "http://93.184.216.34/",
        "https://user:secret@example.com/hook",
        "http://[2606:4700:4700::1111]/",
        "https://localhost.example.com/",
    ],
)
def test_a_public_destination_is_accepted(url: str) -> None:
    AddressGuard().check_url(url)


def test_credentials_in_a_refused_url_are_not_repeated_in_the_message() -> None:
    with pytest.raises(BlockedDestination) as caught:
        AddressGuard().check_url("http://user:secret@127.0.0.1/")

    assert "secret" not in caught.value.message


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_allow_private_accepts_a_private_destination(url: str) -> None:
    AddressGuard(allow_private=True).check_url(url)


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "http:///nopath"])
def test_allow_private_still_refuses_a_url_that_cannot_be_delivered_to(url: str) -> None:
    with pytest.raises(BlockedDestination):
        AddressGuard(allow_private=True).check_url(url)


def test_a_port_outside_the_allowed_ports_is_refused() -> None:
    guard = AddressGuard(allowed_ports=frozenset({443, 8443}))

    with pytest.raises(BlockedDestination, match=r"port 8080 is not allowed.*\(443, 8443\)"):
        guard.check_url("https://example.com:8080/hook")


def test_the_default_port_of_the_scheme_counts_against_the_allowed_ports() -> None:
    guard = AddressGuard(allowed_ports=frozenset({443}))

    guard.check_url("https://example.com/hook")
    with pytest.raises(BlockedDestination, match="port 80 is not allowed"):
        guard.check_url("http://example.com/hook")


def test_allowed_ports_apply_even_when_private_networks_are_allowed() -> None:
    guard = AddressGuard(allow_private=True, allowed_ports=frozenset({8080}))

    guard.check_url("http://127.0.0.1:8080/")
    with pytest.raises(BlockedDestination, match="port 9090 is not allowed"):
        guard.check_url("http://127.0.0.1:9090/")


def test_port_zero_is_refused() -> None:
    with pytest.raises(BlockedDestination, match="port 0"):
        AddressGuard().check_url("https://example.com:0/")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.1",
        "198.18.0.1",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",
        "ff02::1",
        "ff0e::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "2002:7f00:1::1",
        "2002:a00:1::",
        "64:ff9b::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ],
)
def test_a_non_public_address_is_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "2606:4700:4700::1111",
        "::ffff:93.184.216.34",
        "2002:5db8:d822::1",
        "64:ff9b::93.184.216.34",
    ],
)
def test_a_public_address_is_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f.0.0.0x1", "127.0.0.1"),
        ("0x7f.01", "127.0.0.1"),
        ("0xa9.0376.43518", "169.254.169.254"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("127.0.0.1 trailing", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("[fe80::1%25eth0]", "fe80::1%eth0"),
    ],
)
def test_every_numeric_spelling_the_c_resolver_reads_is_recognised(
    host: str, expected: str
) -> None:
    assert parse_numeric_host(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost",
        "127.0.0.1.",
        "127.0.0.1.5",
        "256.0.0.1",
        "1.16777216",
        "4294967296",
        "08.0.0.1",
        "0x",
        "0x7g",
        "127..1",
        " 127.0.0.1",
        "",
        "1" * 5000,
        "[1.2.3.4]",
        "[example.com]",
        "::1::2",
    ],
)
def test_a_host_name_or_invalid_number_is_not_numeric(host: str) -> None:
    assert parse_numeric_host(host) is None


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="compares with glibc's inet_aton")
@settings(database=None, deadline=None, max_examples=500)
@given(st.text(alphabet="0123456789abcdefxX. \t", max_size=24))
def test_numeric_parsing_agrees_with_the_c_resolver(host: str) -> None:
    assert parse_numeric_host(host) == _inet_aton(host)


def test_a_resolved_private_address_is_refused() -> None:
    with pytest.raises(BlockedDestination, match=r"'public\.example' resolved to 127\.0\.0\.1"):
        AddressGuard().check_address("public.example", "127.0.0.1")


@pytest.mark.parametrize("ip", ["fe80::1%eth0", "::ffff:10.0.0.1", "not-an-address"])
def test_a_resolved_address_that_cannot_be_vouched_for_is_refused(ip: str) -> None:
    with pytest.raises(BlockedDestination):
        AddressGuard().check_address("public.example", ip)


def test_a_resolved_public_address_is_accepted() -> None:
    AddressGuard().check_address("public.example", "93.184.216.34")


def test_allow_private_accepts_any_resolved_address() -> None:
    AddressGuard(allow_private=True).check_address("public.example", "127.0.0.1")


async def test_the_resolver_passes_public_addresses_through() -> None:
    inner = FakeResolver({"public.example": ["93.184.216.34"]})
    resolver = GuardedResolver(inner, AddressGuard())

    results = await resolver.resolve("public.example", 443)

    assert [r["host"] for r in results] == ["93.184.216.34"]
    assert results[0]["port"] == 443


async def test_the_resolver_refuses_a_name_that_now_points_at_loopback() -> None:
    inner = FakeResolver({"public.example": ["93.184.216.34"]})
    resolver = GuardedResolver(inner, AddressGuard())
    await resolver.resolve("public.example", 80)

    inner.addresses["public.example"] = ["127.0.0.1"]
    with pytest.raises(BlockedAddressError) as caught:
        await resolver.resolve("public.example", 80)

    assert caught.value.host == "public.example"
    assert caught.value.refused == ["127.0.0.1"]
    assert caught.value.errno is None
    assert "127.0.0.1, which is loopback" in str(caught.value)


async def test_the_resolver_drops_private_addresses_and_keeps_public_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = FakeResolver({"mixed.example": ["10.0.0.7", "93.184.216.34", "::1"]})
    resolver = GuardedResolver(inner, AddressGuard())

    with caplog.at_level(logging.WARNING, logger="tidings.guard"):
        results = await resolver.resolve("mixed.example", 80)

    assert [r["host"] for r in results] == ["93.184.216.34"]
    assert [r.__dict__.get("action") for r in caplog.records] == ["address_refused"]


async def test_the_resolver_lets_everything_through_when_private_networks_are_allowed() -> None:
    inner = FakeResolver({"public.example": ["127.0.0.1"]})
    resolver = GuardedResolver(inner, AddressGuard(allow_private=True))

    results = await resolver.resolve("public.example", 80)

    assert [r["host"] for r in results] == ["127.0.0.1"]


async def test_the_resolver_closes_only_an_inner_resolver_it_made() -> None:
    inner = FakeResolver({})

    await GuardedResolver(inner).close()

    assert not inner.closed


async def test_a_post_to_a_name_that_resolves_to_loopback_is_blocked(receiver: Receiver) -> None:
    inner = FakeResolver({"public.example": ["127.0.0.1"]})
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(inner, AddressGuard()))

    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
            await session.post(f"http://public.example:{receiver.port}/", json={"n": 1})

    assert is_blocked_error(caught.value)
    assert isinstance(caught.value.os_error, BlockedAddressError)
    assert caught.value.__cause__ is caught.value.os_error
    assert receiver.paths == []


async def test_the_same_post_reaches_the_receiver_when_private_networks_are_allowed(
    receiver: Receiver,
) -> None:
    inner = FakeResolver({"public.example": ["127.0.0.1"]})
    guard = AddressGuard(allow_private=True)
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(inner, guard))

    async with (
        aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session,
        session.post(f"http://public.example:{receiver.port}/", json={"n": 1}) as response,
    ):
        assert response.status == 204

    assert receiver.paths == ["/"]


async def test_a_hex_spelling_of_loopback_is_blocked_by_the_default_resolver(
    receiver: Receiver,
) -> None:
    # aiohttp hands hosts with letters to the resolver, and getaddrinfo reads 0x7f000001
    # as 127.0.0.1 without any DNS traffic.
    connector = aiohttp.TCPConnector(resolver=GuardedResolver())

    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        with pytest.raises(aiohttp.ClientConnectorDNSError) as caught:
            await session.post(f"http://0x7f000001:{receiver.port}/")

    assert is_blocked_error(caught.value)
    assert receiver.paths == []


async def test_a_literal_ip_skips_the_resolver_so_check_url_must_run_before_each_attempt(
    receiver: Receiver,
) -> None:
    inner = FakeResolver({})
    guard = AddressGuard()
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(inner, guard))
    url = f"http://127.0.0.1:{receiver.port}/"

    async with (
        aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session,
        session.post(url) as response,
    ):
        assert response.status == 204

    assert inner.calls == []
    with pytest.raises(BlockedDestination):
        guard.check_url(url)


def test_a_refusal_is_found_through_causes_contexts_and_os_errors() -> None:
    blocked = BlockedAddressError("public.example", ["127.0.0.1"], "refused")
    wrapper = OSError(None, "wrapper")
    wrapper.__context__ = blocked
    outer = RuntimeError("outer")
    outer.__cause__ = wrapper

    assert find_blocked_error(outer) is blocked
    assert is_blocked_error(ExceptionGroup("several", [ValueError(), outer]))


def test_a_refusal_by_check_url_counts_as_blocked() -> None:
    assert is_blocked_error(BlockedDestination("refused"))


def test_an_ordinary_connection_failure_is_not_blocked() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")
    looped = RuntimeError("loop")
    looped.__context__ = refused
    refused.__context__ = looped

    assert not is_blocked_error(looped)


def _result(host: str, ip: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return ResolveResult(
        hostname=host, host=ip, port=port, family=family, proto=0, flags=socket.AI_NUMERICHOST
    )
