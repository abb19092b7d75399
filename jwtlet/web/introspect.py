"""
``POST /introspect`` on the token exchange port (RFC 7662; migration.md,
Mozambigue): a service in any language asks whether a subject token is one
jwtlet accepts and whose it is, instead of linking a validation library.

The caller authenticates with its own bearer token, checked like a
management caller's (``management.client_audience``, rejections remembered),
and must hold the role ``jwtlet:introspect``.  The token asked about is
checked by the configured validator against ``token.client_audience``.  The
answer says whether it is active and, if it is, whose it is; never why it is
not.  Rate limits are the exchange's (the caller counts as the client), and
the body limit is the token port's.
"""

from __future__ import annotations

from typing import Mapping, Optional

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.web.iweb import IRequest

from jwtlet import policy
from jwtlet.audiences import Accepted, validate_for_any
from jwtlet.interfaces import TokenRejected
from jwtlet.jwtverify import unverified_claims
from jwtlet.logs import emit
from jwtlet.model import Identity, JSONObject, JSONValue
from jwtlet.policy import RateLimited
from jwtlet.providers import Validator
from jwtlet.ratelimit import RateLimiter
from jwtlet.web.callers import INTROSPECT, RejectionCache, caller_identity
from jwtlet.web.errors import APIError
from jwtlet.web.responses import NO_STORE, json_response

log = Logger(namespace="jwtlet.introspect")

INACTIVE: JSONObject = {"active": False}


def _numeric_date(value: JSONValue) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def introspection(accepted: Accepted, claims: Mapping[str, JSONValue]) -> JSONObject:
    """
    The RFC 7662 answer for a token the validator accepted: the identity the
    validator established, and of the token's own claims (which the
    validator vouched for) ``sub``, ``aud`` and ``iat``.  ``exp`` is when
    jwtlet stops accepting the token, which a maximum token age may make
    earlier than the claim.  Members nobody knows are left out.
    """
    identity: Identity = accepted.identity
    audience = claims.get("aud")
    if not (isinstance(audience, str) or (isinstance(audience, list) and all(isinstance(a, str) for a in audience))):
        audience = accepted.audience
    subject = claims.get("sub")
    expires = _numeric_date(identity.expires_at)
    answer: dict[str, JSONValue] = {
        "active": True,
        "iss": identity.issuer,
        "sub": subject if isinstance(subject, str) else identity.username,
        "aud": audience,
        "exp": expires if expires is not None else _numeric_date(claims.get("exp")),
        "iat": _numeric_date(claims.get("iat")),
        "username": identity.username,
        "namespace": identity.namespace,
        "serviceAccount": identity.name,
        "uid": identity.uid,
    }
    return {name: value for name, value in answer.items() if value is not None}


def token_parameter(form: Mapping[str, list[str]]) -> str:
    """The one ``token`` of the form (``token_type_hint`` is optional and, as RFC 7662 allows, not needed)."""
    values = form.get("token", [])
    if len(values) != 1 or not values[0]:
        raise policy.invalid_request("give exactly one non-empty token")
    if len(form.get("token_type_hint", [])) > 1:
        raise policy.invalid_request("token_type_hint given twice")
    return values[0]


@attrs.define
class Introspection:
    """Answers ``POST /introspect``; see the module docstring."""

    validator: Validator
    #: what the token asked about must have been issued for (``token.client_audience``)
    subject_audiences: tuple[str, ...]
    #: what the caller's own token must have been issued for (``management.client_audience``)
    caller_audiences: tuple[str, ...]
    roles: Mapping[str, tuple[str, ...]]
    limiter: RateLimiter
    clock: IReactorTime
    #: who may introspect: the management port's callers, whose rejected
    #: tokens it shares (one validator call per garbage token, whichever port)
    callers: RejectionCache
    #: rejected subject tokens too: a caller repeating garbage costs no validator calls
    _subjects: RejectionCache = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._subjects = RejectionCache(self.validator, self.clock)

    async def answer(self, request: IRequest, form: Mapping[str, list[str]]) -> bytes:
        """The answer to ``request``, whose body the token port has read as ``form``."""
        caller = await caller_identity(self.callers, request.getHeader(b"authorization"), self.caller_audiences)
        if caller is None:
            raise APIError(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
        if INTROSPECT not in self.roles.get(caller.username, ()):
            emit(log, "authz.denied", LogLevel.warn, actor=caller.username, route="/introspect",
                 method="POST", role=INTROSPECT)
            raise APIError(403, {"error": "forbidden"})
        token = token_parameter(form)
        # Spent once the caller is known, as an exchange spends them once its credential validated.
        for check in (self.limiter.check_global, lambda: self.limiter.check(caller.username)):
            retry_after = check()
            if retry_after is not None:
                raise RateLimited(retry_after)
        try:
            accepted = await validate_for_any(self._subjects, token, self.subject_audiences)
        except TokenRejected:
            answer = INACTIVE
        else:
            answer = introspection(accepted, unverified_claims(token))
        emit(log, "token.introspected", LogLevel.info, actor=caller.username, active=answer["active"])
        return json_response(request, answer, 200, NO_STORE)
