"""
The JWKS fetch that concurrent validations share (jwtlet.jwks.RemoteKeys):
one fetch for all waiting callers, and a caller that gives up gives up only
its own wait.
"""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from jwtlet.interfaces import DependencyUnavailable
from jwtlet.jwks import FETCH_TIMEOUT_SECS, RemoteKeys
from jwtlet.outbound import MAX_ANSWER_BYTES
from jwtlet.testing.kubernetes import SigningKey

ISSUER = "https://issuer.test"


class HeldJwks(Resource):
    """A JWKS endpoint that answers only when the test lets it."""

    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.document = document
        self.held: list[IRequest] = []

    def render_GET(self, request: IRequest) -> object:  # noqa: N802 - Twisted's name
        self.held.append(request)
        return NOT_DONE_YET

    def answer_all(self) -> None:
        for request in self.held:
            request.setHeader(b"Content-Type", b"application/json")
            request.write(self.document)
            request.finish()
        self.held = []


def test_a_caller_that_gives_up_does_not_fail_the_fetch_the_others_wait_for() -> None:
    """A /ready probe's bound, or a client hanging up, must not cancel the fetch every other validation needs."""
    key = SigningKey.generate()
    endpoint = HeldJwks(json.dumps({"keys": [key.public()]}).encode())
    client = StubTreq(endpoint)
    keys = RemoteKeys(issuer=ISSUER, jwks_uri=f"{ISSUER}/jwks", http_client=client, reactor=Clock(), ttl=60)
    impatient = ensureDeferred(keys.current(0))
    patient = ensureDeferred(keys.current(0))
    client.flush()
    assert len(endpoint.held) == 1, "the callers share one fetch"
    impatient.cancel()
    gave_up: list[Failure] = []
    impatient.addErrback(gave_up.append)
    assert gave_up and gave_up[0].check(CancelledError)
    endpoint.answer_all()
    client.flush()
    assert key.kid in patient.result.keys


class StalledJwks(Resource):
    """A peer that sends its headers and the start of a body, then nothing more."""

    isLeaf = True

    def render_GET(self, request: IRequest) -> object:  # noqa: N802 - Twisted's name
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"100000")
        request.write(b'{"keys": [')
        return NOT_DONE_YET


def test_a_peer_that_stalls_its_body_is_a_failed_fetch_at_the_timeout() -> None:
    """treq's own timeout ends with the headers: without a bound on the body, every validation would hang."""
    clock = Clock()
    client = StubTreq(StalledJwks())
    keys = RemoteKeys(issuer=ISSUER, jwks_uri=f"{ISSUER}/jwks", http_client=client, reactor=clock, ttl=60)
    pending = ensureDeferred(keys.current(0))
    client.flush()
    assert not pending.called
    clock.advance(FETCH_TIMEOUT_SECS)
    failed: list[Failure] = []
    pending.addErrback(failed.append)
    assert failed and failed[0].check(DependencyUnavailable)


class HugeJwks(Resource):
    isLeaf = True

    def render_GET(self, request: IRequest) -> bytes:  # noqa: N802 - Twisted's name
        return b'{"keys": [' + b" " * (MAX_ANSWER_BYTES + 1) + b"]}"


def test_a_peer_answering_more_than_a_mebibyte_is_a_failed_fetch() -> None:
    client = StubTreq(HugeJwks())
    keys = RemoteKeys(issuer=ISSUER, jwks_uri=f"{ISSUER}/jwks", http_client=client, reactor=Clock(), ttl=60)
    pending = ensureDeferred(keys.current(0))
    client.flush()
    failed: list[Failure] = []
    pending.addErrback(failed.append)
    assert failed and failed[0].check(DependencyUnavailable)
