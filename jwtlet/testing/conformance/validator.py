"""
The conformance suite every IValidator must pass (plugin authors: run it on
yours).  A test module subclasses :class:`ValidatorConformance` and provides a
``harness`` pytest fixture returning a :class:`ValidatorHarness`: the
validator, built and ready, and how to make the credentials the suite
presents.  Give every test a fresh harness (a function-scoped fixture).

What the suite holds a validator to (plugins.md): it provides
``IValidator``; a good credential yields the ``Identity`` it names, with
consistent times; anything else -- garbage, forgeries, a credential for
another audience, an expired or withdrawn one -- is a ``TokenRejected`` and
never another exception; and when the service it asks is down, a good
credential is a ``DependencyUnavailable`` (503, retry), never a
``TokenRejected`` (which would tell a client its good credential is bad).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import attrs
import pytest
import pytest_twisted
from jwcrypto.common import base64url_encode
from twisted.internet.interfaces import IReactorTime
from zope.interface.verify import verifyObject

from jwtlet.interfaces import DependencyUnavailable, IValidator, TokenRejected
from jwtlet.model import Identity
from jwtlet.providers import as_deferred

#: Far more than any validator should read: the limit must come first.
OVERSIZED = 1024 * 1024
#: An audience no harness issues credentials for.
ANOTHER_AUDIENCE = "https://another-service.example"


@attrs.frozen
class ValidatorHarness:
    """
    How the suite drives one validator.  Each token callable makes a
    credential when called (it may change the world, e.g. delete the account
    after minting).  ``None`` says the validator has no such notion (API keys
    carry no audience and do not expire), and the tests needing it are
    skipped with that reason.

    :ivar validator: the validator under test, built and ready.
    :ivar clock: the clock the validator was given.
    :ivar audience: what ``validate`` is asked for with a good credential.
    :ivar username: the ``Identity.username`` a good credential yields.
    :ivar good_token: a credential the validator must accept.
    :ivar other_audience_token: one issued for another audience.
    :ivar expired_token: one that expired before now.
    :ivar withdrawn_token: one its issuer has since withdrawn (account
        deleted, key revoked) while it has not expired.
    :ivar take_peer_down: makes the service the validator asks unreachable;
        called before the validator has been used.
    """

    validator: Any
    clock: IReactorTime
    audience: Optional[str]
    username: str
    good_token: Callable[[], str]
    other_audience_token: Optional[Callable[[], str]] = None
    expired_token: Optional[Callable[[], str]] = None
    withdrawn_token: Optional[Callable[[], str]] = None
    take_peer_down: Optional[Callable[[], None]] = None


def _b64(data: bytes) -> str:
    return str(base64url_encode(data))


def _b64_json(value: Any) -> str:
    return _b64(json.dumps(value).encode())


def _tampered(token: str) -> str:
    """``token`` with one character well inside its last part changed (not the last one: base64 padding bits)."""
    position = max(len(token) - 10, 0)
    return token[:position] + ("B" if token[position] == "A" else "A") + token[position + 1:]


def hostile_tokens(good: str) -> list[str]:
    """
    Malformed, oversized and forged credentials; the forgeries reuse the
    parts of ``good`` when it is a compact JWS.
    """
    parts = good.split(".")
    payload, signature = (parts[1], parts[2]) if len(parts) == 3 else (_b64_json({"sub": "x"}), _b64(b"s" * 256))
    fetch_my_keys = _b64_json({"alg": "RS256", "kid": "../../../../dev/null",
                               "jku": "https://attacker.example/jwks", "x5u": "https://attacker.example/cert"})
    nested = _b64(b"[" * 100_000 + b"]" * 100_000)
    huge_number = _b64(b'{"exp": 1' + b"0" * 5000 + b"}")
    return [
        "", " ", "not-a-token", ".", "..", "a.b.c", "e30.e30.", "e30.e30.e30",
        "\x00" * 32, "ü" * 64, "\ud800" * 32, "\r\nX-Injected: 1",
        "x" * OVERSIZED,
        f"eyJ{'A' * OVERSIZED}.{payload}.{signature}",
        # Forgeries: no signature, the algorithm switched to HMAC (keyed, by a
        # naive verifier, with the public key), keys from where the attacker says.
        f"{_b64_json({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        f"{_b64_json({'alg': 'HS256', 'typ': 'JWT'})}.{payload}.{signature}",
        f"{fetch_my_keys}.{payload}.{signature}",
        # Documents that break naive JSON parsers.
        f"{nested}.{payload}.{signature}",
        f"{_b64_json({'alg': 'RS256'})}.{huge_number}.{signature}",
        # The good credential, damaged.
        _tampered(good), good[: len(good) // 2], good + ".x", "Bearer " + good, good + "\x00",
    ]


async def _validate(harness: ValidatorHarness, token: str, audience: Optional[str]) -> Identity:
    identity: Identity = await as_deferred(harness.validator.validate(token, audience))
    return identity


async def _rejected(harness: ValidatorHarness, token: str, audience: Optional[str]) -> None:
    """``token`` fails with ``TokenRejected`` alone, and the error does not echo it (errors reach logs)."""
    with pytest.raises(TokenRejected) as raised:
        await _validate(harness, token, audience)
    if len(token) >= 16:
        assert token not in str(raised.value), "the rejection repeats the token"


class ValidatorConformance:
    """Behaviour every validator shares; subclasses supply the ``harness`` fixture."""

    def test_provides_the_interface(self, harness: ValidatorHarness) -> None:
        verifyObject(IValidator, harness.validator)

    @pytest_twisted.ensureDeferred
    async def test_a_good_token_yields_its_identity_with_consistent_times(self, harness: ValidatorHarness) -> None:
        now = harness.clock.seconds()
        identity = await _validate(harness, harness.good_token(), harness.audience)
        assert isinstance(identity, Identity)
        assert identity.username == harness.username
        assert isinstance(identity.issuer, str) and identity.issuer, "the issuer is part of who the caller is"
        if identity.expires_at is not None:
            assert identity.expires_at > now, "a credential just accepted has not expired"
        if identity.accepted_until is not None:
            assert identity.expires_at is not None, "accepted_until without expires_at"
            assert identity.accepted_until >= identity.expires_at

    @pytest_twisted.ensureDeferred
    async def test_an_attacker_sending_garbage_or_forgeries_gets_token_rejected(
        self, harness: ValidatorHarness
    ) -> None:
        """
        An attacker presents empty, oversized, malformed, hostile-JSON and
        forged credentials: each one is a ``TokenRejected`` (400/401), never
        another exception (a 500) nor a ``DependencyUnavailable`` (an attacker
        must not make jwtlet look down), and the error does not repeat it.
        """
        for token in hostile_tokens(harness.good_token()):
            await _rejected(harness, token, harness.audience)

    @pytest_twisted.ensureDeferred
    async def test_a_token_for_another_audience_is_refused(self, harness: ValidatorHarness) -> None:
        """
        An attacker replays here a credential issued for another service, or
        asks for another audience with a good one: both are refused.
        """
        if harness.other_audience_token is None:
            pytest.skip("this validator's credentials carry no audience")
        await _rejected(harness, harness.other_audience_token(), harness.audience)
        await _rejected(harness, harness.good_token(), ANOTHER_AUDIENCE)

    @pytest_twisted.ensureDeferred
    async def test_an_expired_token_is_refused(self, harness: ValidatorHarness) -> None:
        if harness.expired_token is None:
            pytest.skip("this validator's credentials do not expire")
        await _rejected(harness, harness.expired_token(), harness.audience)

    @pytest_twisted.ensureDeferred
    async def test_a_withdrawn_credential_is_refused(self, harness: ValidatorHarness) -> None:
        if harness.withdrawn_token is None:
            pytest.skip("this validator cannot learn that a credential was withdrawn")
        await _rejected(harness, harness.withdrawn_token(), harness.audience)

    @pytest_twisted.ensureDeferred
    async def test_its_peer_down_makes_a_good_token_unavailable_not_rejected(
        self, harness: ValidatorHarness
    ) -> None:
        """
        The service the validator asks is down: a good credential gets
        ``DependencyUnavailable`` (503 and retry), never ``TokenRejected``.
        """
        if harness.take_peer_down is None:
            pytest.skip("this validator asks no other service")
        token = harness.good_token()
        harness.take_peer_down()
        with pytest.raises(DependencyUnavailable):
            await _validate(harness, token, harness.audience)
