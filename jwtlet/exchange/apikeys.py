"""
API keys as a credential the exchange validates: a key is checked against its
stored digest and, for an active key, becomes an identity naming the key of
the integration, with its tier.  Every kind of bad key is the same rejection,
so nobody can learn which part was wrong.
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from jwtlet.apikeys import keys as apikeys
from jwtlet.interfaces import IValidator, NotFound, TokenRejected
from jwtlet.model import ApiKeyRecord, Identity
from jwtlet.providers import Store, adapt

#: The ``issuer`` of every API-key identity: no Kubernetes issuer can be it.
API_KEY_ISSUER = "jwtlet:api-key"

# Compared against when a key id is unknown, so that both paths do the same work.
_ABSENT_DIGEST = bytes(32)


class InvalidKey(Exception):
    """Missing, malformed, unknown, revoked or wrong: deliberately one error."""


def _adapted_store(store: object) -> Store:
    return adapt("store", store)


@attrs.frozen
class ApiKeyVerifier:
    """
    Checks a presented key against the store (adapted here when a plugin
    hands over the store it was built with).
    """

    store: Store = attrs.field(converter=_adapted_store)
    prefix: str

    async def verify(self, text: Optional[str]) -> ApiKeyRecord:
        parsed = apikeys.parse_key(text or "", self.prefix)
        if parsed is None:
            raise InvalidKey()
        try:
            record = await self.store.get_api_key(parsed.integration_id, parsed.key_id)
        except NotFound:
            apikeys.secret_matches(parsed.secret, _ABSENT_DIGEST)
            raise InvalidKey() from None
        if not apikeys.secret_matches(parsed.secret, record.secret_sha256) or not record.active:
            raise InvalidKey()
        return record


def key_identity(record: ApiKeyRecord) -> Identity:
    """
    Who holds a verified key: ``apikey:<integration>:<key_id>`` (the name its
    rate limit and logs use), with ``int_id``, ``key_id`` and ``tier`` in
    ``extra`` for the claims of its token.
    """
    return Identity(
        username=f"apikey:{record.integration_id}:{record.key_id}",
        issuer=API_KEY_ISSUER,
        extra={"int_id": record.integration_id, "key_id": record.key_id, "tier": int(record.tier)},
    )


@implementer(IValidator)
@attrs.frozen
class ApiKeyValidator:
    """The API-key credential as a validator; keys carry no audience, so none is checked."""

    verifier: ApiKeyVerifier

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        return ensureDeferred(self._validate(token))

    async def _validate(self, token: str) -> Identity:
        try:
            record = await self.verifier.verify(token)
        except InvalidKey:
            raise TokenRejected("invalid API key") from None
        return key_identity(record)
