"""The HTTP server's own protections: request deadlines and draining."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from jwtlet.web import REQUEST_DEADLINE_SECS, DrainingSite


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"hello"


def connect(clock: Clock) -> tuple[object, StringTransport]:
    site = DrainingSite(Hello())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    channel.callLater = clock.callLater  # type: ignore[attr-defined]
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_a_client_trickling_bytes_is_cut_off_at_the_deadline() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    request = b"GET /a-long-path-sent-one-byte-a-second HTTP/1.1\r\n"
    for byte in request[: int(REQUEST_DEADLINE_SECS) - 1]:
        channel.dataReceived(bytes([byte]))  # type: ignore[attr-defined]
        clock.advance(1)
    assert transport.value() == b"", "still within the deadline"
    clock.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout")
    assert transport.value().endswith(b'{"error":"request_timeout"}')
    assert transport.disconnecting


def test_a_prompt_request_is_served_and_the_deadline_cleared() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert b"200 OK" in transport.value() and transport.value().endswith(b"hello")
    assert not [call for call in clock.getDelayedCalls() if call.active() and
                call.getTime() == REQUEST_DEADLINE_SECS]
    clock.advance(REQUEST_DEADLINE_SECS + 1)
    assert b"408" not in transport.value()


def test_drain_fires_when_in_flight_requests_finish() -> None:
    site = DrainingSite(Hello())
    assert site.drain().called
