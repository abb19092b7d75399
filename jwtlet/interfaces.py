"""
The three interfaces through which the core talks to validation, storage and
signing, their factory interfaces, the optional interfaces a provider may
also provide, and the error types every provider raises.

Methods that may wait answer with an :data:`Answer`: a ``Deferred``, a
coroutine (``async def``), another awaitable or a plain value.  The core never
sees that variety: :func:`jwtlet.providers.adapt` wraps each provider once,
where it is built, in an adapter whose methods return ``Deferred``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping, Optional, Sequence, TypeVar, Union

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface

from jwtlet.model import ApiKeyRecord, Identity, Integration, JSONObject, Resolution, ResourceMapping, ScopeMapping

if TYPE_CHECKING:
    from treq.client import HTTPClient

    from jwtlet.config.schema import Config
    from jwtlet.metrics import Metrics

T = TypeVar("T")

#: What a provider method may answer with: a ``Deferred``, a coroutine or any
#: other awaitable firing with ``T``, or ``T`` itself.
Answer = Union[Awaitable[T], T]


# -- errors -----------------------------------------------------------------


class TokenRejected(Exception):
    """
    The presented credential is not acceptable.  The message is for the log
    only; clients are told nothing more than that the token was rejected.
    """


class DependencyUnavailable(Exception):
    """
    A dependency (Kubernetes API, JWKS endpoint, Vault, the database) is down
    or too slow to decide now.  Surfaces as 503 with ``Retry-After``.
    """

    def __init__(self, reason: str = "dependency unavailable", retry_after: int = 5):
        super().__init__(reason)
        self.retry_after = retry_after


class Conflict(Exception):
    """A create named an object that already exists."""


class NotFound(Exception):
    """The named object does not exist."""


class PluginConfigError(Exception):
    """
    A plugin's options are wrong.  ``messages`` holds one line per problem,
    each reported with the other configuration errors.
    """

    def __init__(self, *messages: str):
        super().__init__("; ".join(messages))
        self.messages: tuple[str, ...] = messages


# -- the context every factory receives -------------------------------------


@attrs.frozen
class PluginContext:
    """
    Everything a plugin may need when it is built; nothing else is reached for
    through globals.

    :ivar reactor: the reactor the daemon runs on.  Typed by the part every
        provider uses: it also provides ``IReactorTCP``, ``IReactorThreads``
        and the rest, but the test reactors (``MemoryReactorClock``) do not
        all of them, so a provider that needs more says so where it uses it.
    :ivar clock: use it for every expiry and timeout.
    :ivar http_client: an HTTP client with a persistent pool; ``None`` where
        the daemon makes no outbound calls (``jwtlet apikey``).
    :ivar config: the whole parsed :class:`jwtlet.config.Config`.
    :ivar data_dir: where the daemon keeps its files.
    :ivar store: the configured mapping store, for providers that need one
        (the ``api-key`` validator); ``None`` while stores are being built.
    :ivar random_bytes: source of randomness; ``None`` means ``os.urandom``.
    :ivar metrics: the daemon's Prometheus metrics, for providers that count
        what they do (JWKS refreshes); ``None`` outside the daemon.
    :ivar check_only: ``jwtlet check-config`` is building providers only to
        check their options: a factory must report every problem it would
        report at start, but create nothing (no key files, no databases).
    """

    reactor: IReactorTime
    clock: IReactorTime
    http_client: Optional[HTTPClient]
    config: Config
    data_dir: Path
    store: Optional[IMappingStore] = None
    random_bytes: Optional[Callable[[int], bytes]] = None
    check_only: bool = False
    metrics: Optional[Metrics] = None


# -- providers --------------------------------------------------------------


class IValidator(Interface):
    """Checks a presented credential and says whose it is."""

    def validate(token: str, audience: Optional[str]) -> Answer[Identity]:
        """
        Validate ``token``; when ``audience`` is not ``None`` the credential
        must have been issued for it.

        :return: a ``Deferred`` (or coroutine) firing with a
            :class:`jwtlet.model.Identity`; fails with :class:`TokenRejected`
            or :class:`DependencyUnavailable`.
        """


class IMappingStore(Interface):
    """
    Resource mappings, scope mappings, integrations and API keys.

    Every method returns a ``Deferred`` or is ``async def``; none blocks the
    reactor.  A store that cannot reach its backing service fails with
    :class:`DependencyUnavailable`.
    """

    def add_mapping(mapping: ResourceMapping) -> Answer[None]:
        """Store a new ResourceMapping; :class:`Conflict` if its pair exists."""

    def get_mapping(client_identifier: str, participant_context: str) -> Answer[ResourceMapping]:
        """The ResourceMapping of that pair, or :class:`NotFound`."""

    def list_mappings(client_identifier: Optional[str] = None) -> Answer[Sequence[ResourceMapping]]:
        """Every ResourceMapping (of one client, if given), sorted by key."""

    def update_mapping(mapping: ResourceMapping) -> Answer[None]:
        """Replace an existing ResourceMapping; :class:`NotFound` if missing."""

    def delete_mapping(client_identifier: str, participant_context: str) -> Answer[bool]:
        """Delete one mapping; fires with ``True`` if it existed."""

    def delete_client_mappings(client_identifier: str) -> Answer[int]:
        """Delete all mappings of one client; fires with how many went."""

    def add_scope(scope: ScopeMapping) -> Answer[None]:
        """Store a new ScopeMapping; :class:`Conflict` if it exists."""

    def get_scope(scope: str) -> Answer[ScopeMapping]:
        """The ScopeMapping, or :class:`NotFound`."""

    def list_scopes() -> Answer[Sequence[ScopeMapping]]:
        """Every ScopeMapping, sorted by name."""

    def update_scope(scope: ScopeMapping) -> Answer[None]:
        """Replace an existing ScopeMapping; :class:`NotFound` if missing."""

    def delete_scope(scope: str) -> Answer[bool]:
        """Delete a scope mapping; fires with ``True`` if it existed."""

    def resolve(client_identifier: str, participant_context: str, scopes: Sequence[str]) -> Answer[Resolution]:
        """
        In one round trip: the mapping of the pair and the ScopeMappings of
        those of ``scopes`` that exist, as a :class:`jwtlet.model.Resolution`;
        :class:`NotFound` when there is no mapping.
        """

    def add_integration(integration: Integration) -> Answer[None]:
        """Store a new Integration; :class:`Conflict` if it exists."""

    def list_integrations() -> Answer[Sequence[Integration]]:
        """Every Integration with its keys (digests only), sorted by id."""

    def add_api_key(record: ApiKeyRecord) -> Answer[None]:
        """
        Store an ApiKeyRecord; :class:`NotFound` if its integration is
        missing, :class:`Conflict` if the key id is taken.
        """

    def get_api_key(integration_id: str, key_id: str) -> Answer[ApiKeyRecord]:
        """The ApiKeyRecord, or :class:`NotFound`."""

    def revoke_api_key(integration_id: str, key_id: str) -> Answer[bool]:
        """Mark a key revoked; fires with ``True`` if it existed."""


class ISigner(Interface):
    """Signs JWTs and publishes the keys that verify them."""

    algorithm = Attribute("The JWS ``alg`` this signer produces, e.g. ``EdDSA``.")

    def sign(header: JSONObject, claims: JSONObject) -> Answer[str]:
        """
        Sign ``claims`` as a compact JWS.  The signer sets ``alg`` and ``kid``
        in ``header`` (``kid`` names the key version that really signs).

        :return: a ``Deferred`` (or coroutine) firing with ``str``.
        """

    def public_jwks() -> Answer[JSONObject]:
        """A ``Deferred`` (or coroutine) firing with the JWKS ``dict``."""


# -- optional interfaces ----------------------------------------------------


class IReadiness(Interface):
    """
    Optional: a provider that can tell whether it is able to serve now.
    ``/ready`` asks every provider that provides this.
    """

    def check_ready() -> Answer[None]:
        """
        A ``Deferred`` (or coroutine) firing with ``None`` when ready, failing
        with :class:`DependencyUnavailable` when not.
        """


class IReplayRecord(Interface):
    """
    Optional, for stores: remembers subject-token ``jti`` values until the
    token expires, so replicas sharing a store refuse a replayed token.
    """

    def record_token_id(issuer: str, token_id: str, expires_at: float) -> Answer[bool]:
        """Fires with ``True`` when first seen, ``False`` for a replay."""


@attrs.frozen
class TrustedIssuer:
    """
    One issuer a validator accepts identities from, as the config rules of
    security.md see it (distinct username prefixes, ``ext_authz.source_issuers``).

    :ivar issuer: the ``issuer`` its identities carry (``Identity.issuer``):
        what ``ext_authz.source_issuers`` names.
    :ivar username_prefix: what its identities' usernames start with;
        ``None`` when usernames are computed (a CEL expression) and keeping
        them apart is the operator's responsibility.
    :ivar key_path: where the operator wrote that prefix, relative to the
        validator's section (``issuers[0].username_prefix``), for messages.
    :ivar authority: who vouches for its tokens when that is not the issuer's
        own signature (``kubernetes-tokenreview``: the API server it asks).
        Two validators trusting the same issuer through different authorities
        may be seeing two clusters, so their identities are kept apart too.
    """

    issuer: str
    username_prefix: Optional[str]
    key_path: str
    authority: Optional[str] = None


class ITrustedIssuers(Interface):
    """
    Optional, for validators: whom they trust, so that the core can apply
    security.md's rules across validators (a second validator for ext_authz)
    without knowing any validator by name.  A validator that does not provide
    it is trusted as it is: none of those rules can be checked for it.
    """

    needs_explicit_audience = Attribute(
        "``True`` when the validator checks ``aud`` only if given an audience (a JWT checked by its keys): "
        "the ext_authz front must then name one, or any relying party's token would be swapped."
    )

    def trusted_issuers() -> Sequence[TrustedIssuer]:
        """Every issuer it accepts identities from, in the order the operator listed them."""


# -- factories --------------------------------------------------------------


class IProviderFactory(Interface):
    """What the three factory interfaces share."""

    name = Attribute("The string used as ``type`` in config.")
    description = Attribute("One line saying what the plugin does.")

    def build(options: Mapping[str, object], context: PluginContext) -> object:
        """
        Build a configured provider from ``options`` (the config section minus
        ``type``).  Raise :class:`PluginConfigError` with one message per
        problem.  A provider that also provides ``IService`` is started and
        stopped with the daemon.
        """


class IValidatorFactory(IProviderFactory):
    """Builds an :class:`IValidator`."""


class IMappingStoreFactory(IProviderFactory):
    """Builds an :class:`IMappingStore`."""


class ISignerFactory(IProviderFactory):
    """Builds an :class:`ISigner`."""
