"""
Data that crosses the plugin boundary: identities, mappings, API-key records.

Every class is a frozen attrs class so that a provider can hand the same
object to several callers (and caches) without anyone mutating it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import attrs

#: Any JSON value (a claim, a JWKS member).  The type system cannot say "JSON"
#: without a recursive union every reader would have to narrow, so these two
#: aliases are the one place ``Any`` stands for it.
JSONValue = Any  # type: ignore[explicit-any]
JSONObject = dict[str, JSONValue]


def _sorted_tuple(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values)))


@attrs.frozen
class Identity:
    """
    Who presented a credential, as a validator established it.

    ``username`` is the full Kubernetes username
    (``system:serviceaccount:<namespace>:<name>``) or, for API keys,
    ``apikey:<integration>:<key_id>``.

    What a mapping's CEL expressions see of the caller (claims.md) comes from
    here: ``claims`` are the validated claims of the credential (empty when
    the validator saw none, as for TokenReview), ``extra`` is
    map(string, list(string)) in the shape of TokenReview's
    ``status.user.extra`` (``authentication.kubernetes.io/pod-name`` ...).
    A plugin author's validator fills the same fields.  (API keys keep their
    ``int_id``, ``key_id`` and ``tier`` in ``extra``: their exchange runs no
    expressions.)
    """

    username: str
    issuer: str
    uid: Optional[str] = None
    namespace: Optional[str] = None
    name: Optional[str] = None
    groups: tuple[str, ...] = ()
    extra: Mapping[str, JSONValue] = attrs.field(factory=dict)
    claims: Mapping[str, JSONValue] = attrs.field(factory=dict)
    expires_at: Optional[float] = None
    token_id: Optional[str] = None
    #: The last instant the validator would still accept this credential
    #: (``exp`` plus its leeway); a replayed ``jti`` must be remembered until
    #: then.  ``None``: the same as ``expires_at``.
    accepted_until: Optional[float] = None


@attrs.frozen
class ResourceMapping:
    """
    A client identity may ask for tokens naming one participant context,
    with at most these scopes and audiences, when ``condition`` (a CEL
    expression, claims.md) holds; ``claim_expressions`` compute claims of the
    issued token from the caller.  Expressions are kept as their source: they
    are compiled once per source (:mod:`jwtlet.claims`), so a mapping whose
    expression no longer compiles can still be listed, read and fixed.
    """

    client_identifier: str
    participant_context: str
    scopes: tuple[str, ...] = attrs.field(default=(), converter=_sorted_tuple)
    audiences: tuple[str, ...] = attrs.field(default=(), converter=_sorted_tuple)
    condition: Optional[str] = None
    claim_expressions: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.client_identifier, self.participant_context)


@attrs.frozen
class ScopeMapping:
    """
    A scope and the claims it adds to an issued token: the same ``claims``
    for every caller, and ``claim_expressions`` computed from the caller.
    """

    scope: str
    claims: Mapping[str, JSONValue] = attrs.field(factory=dict)
    claim_expressions: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Resolution:
    """
    What one exchange needs from the store, fetched in one round trip: the
    mapping and the scope mappings of the requested scopes that exist.
    """

    mapping: ResourceMapping
    scopes: Mapping[str, ScopeMapping] = attrs.field(factory=dict)


@attrs.frozen
class ApiKeyRecord:
    """
    One API key as stored: never the secret, only its SHA-256 digest.
    """

    integration_id: str
    key_id: str
    secret_sha256: bytes = attrs.field(repr=False)
    tier: int = 0
    description: str = ""
    status: str = "active"
    created_at: float = 0.0
    #: the profiles its integration is bound to (``None``: every profile), as the store read them with the key
    profiles: Optional[tuple[str, ...]] = None

    @property
    def active(self) -> bool:
        return self.status == "active"


@attrs.frozen
class Integration:
    """
    An integration (a customer or service) that owns API keys, bound to the
    API-key profiles its keys may get tokens for (migration.md, M-Lab: one
    credential namespace per profile).  ``None``: every profile, what an
    integration stored before profiles were bound keeps.
    """

    integration_id: str
    description: str = ""
    created_at: float = 0.0
    keys: tuple[ApiKeyRecord, ...] = ()
    profiles: Optional[tuple[str, ...]] = None
