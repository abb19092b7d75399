"""
The HTTP server's own protections, on an in-memory connection: request
deadlines, body limits enforced while the body arrives, no form parsing by
Twisted, the connection cap, and draining.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from jwtlet.web.server import LINGER_SECS, REQUEST_DEADLINE_SECS, BodyLimits, DrainingSite

PEER = IPv4Address("TCP", "127.0.0.1", 40000)
LIMITS = BodyLimits(1024, {b"/none/": 0})


class Recorder(Resource):
    """Answers ``hello`` and keeps the ``args`` and body of every request that reached it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[bytes, list[bytes]], bytes]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((request.args, request.content.read()))
        return b"hello"


class HalfClosingTransport(StringTransport):
    """A TCP-like transport that records a shut write side (StringTransport has none)."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def connect(
    clock: Clock, site: Optional[DrainingSite] = None, transport: Optional[StringTransport] = None
) -> tuple[Any, StringTransport]:
    site = site if site is not None else DrainingSite(Recorder())
    channel = site.buildProtocol(PEER)
    assert channel is not None, "refused by the connection cap"
    channel.callLater = clock.callLater
    transport = transport if transport is not None else HalfClosingTransport()
    channel.makeConnection(transport)
    return channel, transport


def post_head(path: bytes, *headers: bytes) -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def assert_413(transport: StringTransport) -> None:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), transport.value()
    assert b"Content-Type: application/json" in head.split(b"\r\n")
    assert json.loads(body) == {"error": "request_too_large"}


def test_a_client_trickling_bytes_is_cut_off_at_the_deadline() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    request = b"GET /a-long-path-sent-one-byte-a-second HTTP/1.1\r\n"
    for byte in request[: int(REQUEST_DEADLINE_SECS) - 1]:
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
    assert transport.value() == b"", "still within the deadline"
    clock.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout")
    assert transport.value().endswith(b'{"error":"request_timeout"}')
    assert transport.disconnecting


def test_a_prompt_request_is_served_and_its_deadline_closes_nothing() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in transport.value() and transport.value().endswith(b"hello")
    clock.advance(REQUEST_DEADLINE_SECS + 1)
    assert b"408" not in transport.value()
    assert not transport.disconnecting, "an idle kept-alive connection is the idle timeout's to close"


def test_each_request_on_a_kept_alive_connection_gets_the_whole_deadline() -> None:
    """One timer serves the connection: moved on when a request starts, it still cuts off the slow one."""
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(REQUEST_DEADLINE_SECS - 1)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")  # the second request starts just before the first's deadline
    clock.advance(REQUEST_DEADLINE_SECS - 1)
    assert b"408" not in transport.value(), "the second request has its own 30 s"
    channel.dataReceived(b"Host: x\r\n\r\n")
    assert transport.value().count(b"200 OK") == 2
    channel.dataReceived(b"GET / HTTP/1.1\r\n")  # a third, which never ends
    clock.advance(REQUEST_DEADLINE_SECS)
    assert b"408 Request Timeout" in transport.value() and transport.disconnecting
    assert len([call for call in clock.getDelayedCalls() if call.active()]) <= 2, "no timer piles up per request"


class CountingHostTransport(HalfClosingTransport):
    """Counts how often the connection's own address is asked for (a getsockname call on a TCP transport)."""

    host_asked = 0

    def getHost(self) -> IPv4Address:  # noqa: N802 - Twisted's name
        self.host_asked += 1
        return IPv4Address("TCP", "127.0.0.1", 8080)


def test_a_connection_asks_its_own_address_once_for_all_its_requests() -> None:
    transport = CountingHostTransport()
    channel, _ = connect(Clock(), transport=transport)
    site = channel.site
    hosts = []
    site.resource.render = lambda request: hosts.append(request.getHost()) or b"hello"
    for _ in range(3):
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [host.port for host in hosts] == [8080, 8080, 8080]
    assert transport.host_asked == 1


class Held(Resource):
    """Keeps every request open until the test finishes it, as a slow exchange would."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Request] = []

    def render(self, request: Request) -> int:
        self.open.append(request)
        return NOT_DONE_YET


def test_drain_waits_for_an_in_flight_request_and_fires_when_it_finishes() -> None:
    held = Held()
    site = DrainingSite(held)
    assert site.drain().called, "nothing in flight: nothing to wait for"
    channel, transport = connect(Clock(), site)
    channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    (request,) = held.open
    drained = site.drain()
    assert not drained.called, "shutdown must wait while a request is in flight"
    request.write(b"late answer")
    request.finish()
    assert drained.called
    # The last chunk and the chunked body's end marker: the whole answer went out.
    assert transport.value().endswith(b"late answer\r\n0\r\n\r\n")


# -- body limits --------------------------------------------------------------


def test_each_path_gets_the_limit_of_its_longest_prefix() -> None:
    limits = BodyLimits(100, {b"/a/": 10, b"/a/b/": 20})
    assert limits.for_path(b"/token") == 100
    assert limits.for_path(b"/a/x") == 10
    assert limits.for_path(b"/a/b/c?x=/") == 20
    assert limits.for_path(b"/x?/a/") == 100, "the query string is not the path"


def test_an_announced_length_over_the_limit_is_refused_before_any_body_arrives() -> None:
    """The attacker announces 8 MiB: 413 goes out on the headers alone and nothing of the body is kept."""
    clock = Clock()
    resource = Recorder()
    channel, transport = connect(clock, DrainingSite(resource, body_limits=LIMITS))
    channel.dataReceived(post_head(b"/token", b"Content-Length: %d" % (8 << 20)))
    assert_413(transport)
    for _ in range(64):
        channel.dataReceived(b"a" * 65536)
    assert channel.requests[0].content is None, "no body buffer was ever made"
    assert resource.seen == [], "the request never reaches a resource"
    assert transport.value().count(b"HTTP/1.1") == 1


def test_expect_100_continue_over_the_limit_gets_the_413_and_no_invitation() -> None:
    clock = Clock()
    channel, transport = connect(clock, DrainingSite(Recorder(), body_limits=LIMITS))
    channel.dataReceived(post_head(b"/token", b"Content-Length: 2048", b"Expect: 100-continue"))
    assert_413(transport)
    assert b"100 Continue" not in transport.value()


def test_a_chunked_body_growing_past_the_limit_is_refused_as_it_arrives() -> None:
    """No length announced: the count of chunks received so far trips the limit."""
    clock = Clock()
    resource = Recorder()
    channel, transport = connect(clock, DrainingSite(resource, body_limits=LIMITS))
    channel.dataReceived(post_head(b"/token", b"Transfer-Encoding: chunked"))
    chunk = b"200\r\n" + b"a" * 0x200 + b"\r\n"
    channel.dataReceived(chunk + chunk)
    assert transport.value() == b"", "1024 bytes are within the limit"
    channel.dataReceived(chunk + chunk + b"0\r\n\r\n")
    assert_413(transport)
    assert channel.requests[0].content.tell() == 1024, "nothing past the limit was kept"
    assert resource.seen == [], "even a body that then ends is never processed"


def test_a_body_within_the_limit_is_served() -> None:
    clock = Clock()
    resource = Recorder()
    channel, transport = connect(clock, DrainingSite(resource, body_limits=LIMITS))
    channel.dataReceived(post_head(b"/token", b"Content-Length: 1024") + b"a" * 1024)
    assert b"200 OK" in transport.value()
    assert resource.seen == [({}, b"a" * 1024)]


def test_a_path_that_takes_no_body_refuses_one_byte() -> None:
    clock = Clock()
    channel, transport = connect(clock, DrainingSite(Recorder(), body_limits=LIMITS))
    channel.dataReceived(post_head(b"/none/check", b"Content-Length: 1") + b"x")
    assert_413(transport)


def test_a_site_without_limits_takes_no_body() -> None:
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(post_head(b"/", b"Content-Length: 1") + b"x")
    assert_413(transport)


def test_a_refused_upload_is_read_and_dropped_until_the_linger_ends() -> None:
    """
    The client keeps sending after the 413: our side is shut after the answer
    (so the client can read it instead of getting a reset), the rest is
    dropped, and the connection closes after LINGER_SECS at the latest.
    """
    clock = Clock()
    channel, transport = connect(clock, DrainingSite(Recorder(), body_limits=LIMITS))
    channel.dataReceived(post_head(b"/token", b"Content-Length: %d" % (8 << 20)))
    assert isinstance(transport, HalfClosingTransport) and transport.write_closed
    assert not transport.disconnecting
    answered = transport.value()
    channel.dataReceived(b"GET /token HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == answered, "nothing more is parsed or answered on this connection"
    clock.advance(LINGER_SECS)
    assert transport.disconnecting


def test_without_a_half_close_a_refused_connection_closes_at_once() -> None:
    """TLS transports cannot shut one side: they close after the answer."""
    clock = Clock()
    channel, transport = connect(clock, DrainingSite(Recorder(), body_limits=LIMITS), StringTransport())
    channel.dataReceived(post_head(b"/token", b"Content-Length: 4096"))
    assert_413(transport)
    assert transport.disconnecting


def test_form_bodies_are_not_parsed_into_args_but_query_strings_are() -> None:
    """Twisted's form and multipart parsing would run over the whole body in the reactor: it is off."""
    clock = Clock()
    resource = Recorder()
    channel, transport = connect(clock, DrainingSite(resource, body_limits=LIMITS))
    form = b"grant_type=x&resource=y"
    channel.dataReceived(post_head(b"/token?q=1", b"Content-Type: application/x-www-form-urlencoded",
                                   b"Content-Length: %d" % len(form)) + form)
    multipart = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n"
    channel.dataReceived(post_head(b"/token", b"Content-Type: multipart/form-data; boundary=b",
                                   b"Content-Length: %d" % len(multipart)) + multipart)
    broken = b"--nope\r\n\r\n"
    channel.dataReceived(post_head(b"/token", b"Content-Type: multipart/form-data; boundary=b",
                                   b"Content-Length: %d" % len(broken)) + broken)
    assert [args for args, _ in resource.seen] == [{b"q": [b"1"]}, {}, {}]
    assert transport.value().count(b"200 OK") == 3, "a malformed multipart body is not Twisted's bare 400"


# -- the connection cap -------------------------------------------------------


def test_past_the_connection_cap_a_new_connection_is_closed_at_once() -> None:
    """The attacker opens connections and holds them: the one past the cap is refused, a freed slot is reused."""
    clock = Clock()
    site = DrainingSite(Recorder(), max_connections=3)
    held = [connect(clock, site) for _ in range(3)]
    assert site.buildProtocol(PEER) is None, "a port closes the connection when it gets no protocol"
    channel, _ = held[0]
    channel.connectionLost(Failure(ConnectionError("client went away")))
    assert site.connections == 2
    channel, transport = connect(clock, site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().endswith(b"hello")


@pytest.mark.parametrize("count", [1, 5])
def test_connections_are_counted_up_and_down(count: int) -> None:
    clock = Clock()
    site = DrainingSite(Recorder(), max_connections=10)
    held = [connect(clock, site) for _ in range(count)]
    assert site.connections == count
    for channel, _ in held:
        channel.connectionLost(Failure(ConnectionError("closed")))
    assert site.connections == 0
