"""
API keys as a credential the exchange validates: a key is checked against its
stored digest and, for an active key, becomes an identity naming the key of
the integration, with its tier.  Every kind of bad key is the same rejection,
so nobody can learn which part was wrong.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from jwtlet.apikeys import keys as apikeys
from jwtlet.interfaces import IValidator, NotFound, TokenRejected
from jwtlet.logs import emit
from jwtlet.model import ApiKeyRecord, Identity, JSONValue
from jwtlet.providers import Store, adapt

log = Logger(namespace="jwtlet.apikeys")

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
    extra: dict[str, JSONValue] = {"int_id": record.integration_id, "key_id": record.key_id, "tier": int(record.tier)}
    if record.profiles is not None:
        extra["profiles"] = list(record.profiles)
    return Identity(username=f"apikey:{record.integration_id}:{record.key_id}", issuer=API_KEY_ISSUER, extra=extra)


def bound_to(key: Identity, profile: str) -> bool:
    """
    Whether a verified key may get ``profile``'s tokens: its integration is
    bound to that profile, or (stored before profiles were bound) to every one.
    """
    profiles = key.extra.get("profiles")
    return profiles is None or (isinstance(profiles, list) and profile in profiles)


@attrs.define
class UnboundIntegrations(Service):
    """
    At start, with several profiles configured, one warning listing the
    integrations stored before integrations were bound to profiles: their
    keys still get every profile's tokens (migration.md, M-Lab).
    """

    store: Store = attrs.field(converter=_adapted_store)
    profiles: Mapping[str, object]

    def startService(self) -> None:
        Service.startService(self)
        ensureDeferred(self.warn()).addErrback(lambda failure: log.failure("listing integrations failed", failure))

    async def warn(self) -> None:
        if len(self.profiles) < 2:
            return
        unbound: list[JSONValue] = [
            found.integration_id for found in await self.store.list_integrations() if found.profiles is None]
        if unbound:
            emit(log, "apikey.unbound_integrations", LogLevel.warn, integrations=unbound,
                 hint="their keys get tokens of every profile: create integrations bound with \"profiles\", "
                      "give their users new keys, then revoke these")


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
