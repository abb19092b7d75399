"""
Providers may answer with a Deferred, a coroutine, any other awaitable or a
plain value; the adapter built around each provider (``jwtlet.providers``)
turns every answer into a Deferred, and none may leave a request waiting
forever.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Generator

from apps import call, make_apps
from twisted.internet.defer import Deferred, succeed
from zope.interface.verify import verifyObject

from jwtlet.interfaces import IMappingStore, ISigner, IValidator
from jwtlet.model import Identity
from jwtlet.providers import Signer, adapt, as_deferred
from jwtlet.testing.fakes import StaticValidator


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
        apps.token_api.signer = Signer(type("AsyncioSigner", (), {
            "algorithm": signer.algorithm,
            "public_jwks": lambda self: loop.create_future(),
            "sign": signer.sign,
        })())
        reply = call(apps.token, "GET", "http://jwtlet.test/.well-known/jwks.json")
        assert reply.code == 500
        assert reply.json() == {"error": "server_error"}
        assert b"Traceback" not in reply.body
    finally:
        loop.close()


class CoroutineValidator:
    """A third-party validator written with ``async def``."""

    async def validate(self, token: str, audience: str | None) -> Identity:
        return Identity(username=f"user:{token}", issuer="https://issuer.test")


def test_an_adapter_answers_with_a_deferred_whatever_the_provider_returns() -> None:
    """The core awaits one kind of answer: the adapter normalises a coroutine, a value or a Deferred."""
    validator = adapt("validator", CoroutineValidator())
    answer = validator.validate("t", None)
    assert isinstance(answer, Deferred)
    assert outcome(answer)[0].username == "user:t"
    pending: Deferred[Identity] = Deferred()
    handed_through = adapt("validator", type("Plain", (), {"validate": lambda self, t, a: pending})())
    assert handed_through.validate("t", None) is pending, "a Deferred goes through as it is: no cost"


def test_an_adapter_provides_the_interface_and_keeps_its_provider() -> None:
    static = StaticValidator()
    validator = adapt("validator", static)
    verifyObject(IValidator, validator)
    assert validator.provider is static
    assert adapt("validator", validator) is validator, "adapting twice changes nothing"
    assert not validator.checks_readiness
    for kind, interface in (("store", IMappingStore), ("signer", ISigner)):
        assert interface.implementedBy(type(adapt(kind, object())))


def test_a_provider_raising_at_once_answers_with_a_failed_deferred() -> None:
    """A plugin that raises instead of failing its Deferred cannot leave a caller's bookkeeping half done."""

    class Raising:
        def get_api_key(self, integration_id: str, key_id: str) -> Any:
            raise RuntimeError("bug in a third-party store")

    answer = adapt("store", Raising()).get_api_key("acme", "k1")
    (failure,) = outcome(answer)
    assert failure.check(RuntimeError)
