"""
Providers may answer with a Deferred, a coroutine, any other awaitable or a
plain value; none of them may leave a request waiting forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Generator

from apps import call, make_apps
from twisted.internet.defer import Deferred, succeed

from jwtlet._async import as_deferred


class AwaitsADeferred:
    """An awaitable that is neither a Deferred nor a coroutine, as a third-party plugin might return."""

    def __init__(self, deferred: Deferred[Any]):
        self.deferred = deferred

    def __await__(self) -> Generator[Any, None, Any]:
        return self.deferred.__await__()


def outcome(deferred: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def test_plain_values_deferreds_and_coroutines() -> None:
    async def coroutine() -> int:
        return 3

    assert outcome(as_deferred(1)) == [1]
    assert outcome(as_deferred(succeed(2))) == [2]
    assert outcome(as_deferred(coroutine())) == [3]


def test_an_awaitable_that_waits_on_a_deferred_is_driven_on_the_reactor() -> None:
    pending: Deferred[str] = Deferred()
    results = outcome(as_deferred(AwaitsADeferred(pending)))
    assert results == []
    pending.callback("keys")
    assert results == ["keys"]


def test_an_asyncio_future_fails_at_once_instead_of_hanging() -> None:
    loop = asyncio.new_event_loop()
    try:
        results = outcome(as_deferred(loop.create_future()))
        assert len(results) == 1
        assert hasattr(results[0], "raiseException"), "an asyncio future must fail, not succeed"
    finally:
        loop.close()


def test_a_signer_answering_jwks_with_an_asyncio_future_gets_an_answer(tmp_path: Path) -> None:
    """The reviewer's third-party signer: /.well-known/jwks.json used to never answer."""
    apps = make_apps(tmp_path)
    loop = asyncio.new_event_loop()
    try:
        signer = apps.providers.signer
        apps.token_api.signer = type("AsyncioSigner", (), {
            "algorithm": signer.algorithm,
            "public_jwks": lambda self: loop.create_future(),
            "sign": signer.sign,
        })()
        reply = call(apps.token, "GET", "http://jwtlet.test/.well-known/jwks.json")
        assert reply.code == 500
        assert reply.json() == {"error": "server_error"}
        assert b"Traceback" not in reply.body
    finally:
        loop.close()
