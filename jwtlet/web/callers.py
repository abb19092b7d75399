"""
Who calls the management port: roles, and the caller's bearer token checked
by the validator with rejections remembered, so that a flood of garbage
tokens cannot become a flood of validator (TokenReview) calls.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import attrs
from cachetools import TTLCache
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jwtlet.audiences import validate_for_any
from jwtlet.interfaces import TokenRejected
from jwtlet.model import Identity
from jwtlet.providers import Validator
from jwtlet.web.requests import bearer_token

log = Logger(namespace="jwtlet.web.callers")

READ = "jwtlet:management:read"
MAPPINGS_WRITE = "jwtlet:management:mappings:write"
SCOPE_WRITE = "jwtlet:management:scope:write"
APIKEYS_WRITE = "jwtlet:management:apikeys:write"
ALL_WRITE = "management:write"
#: ``POST /introspect`` on the token port; not implied by ``management:write``,
#: which grants the management API only.
INTROSPECT = "jwtlet:introspect"


def may(roles: frozenset[str], needed: str) -> bool:
    """Write roles do not imply read; ``management:write`` implies everything."""
    return needed in roles or ALL_WRITE in roles


# A rejected management token is not sent to the validator again for this
# long, and at most this many rejections are remembered (the oldest go first).
REJECTED_TTL_SECS = 60.0
MAX_REJECTED = 10_000


@attrs.define
class RejectionCache:
    """
    A validator in front of another that asks it about a token it rejected
    at most once per ``ttl``, so a flood of garbage bearer tokens cannot
    become a flood of TokenReview calls.  Only rejections are remembered (an
    outage must not lock a valid caller out), by the SHA-256 of audience and
    token (never the token itself), in a bounded cache.  Validations of one
    token already under way are shared, so a burst of one token sent at once
    is one call too; that table holds only requests in flight.
    """

    validator: Validator
    clock: IReactorTime
    ttl: float = REJECTED_TTL_SECS
    max_entries: int = MAX_REJECTED
    _rejected: TTLCache[bytes, bool] = attrs.field(init=False)
    _in_flight: dict[bytes, list[Deferred[Identity]]] = attrs.field(init=False, factory=dict)

    @_rejected.default
    def _new_cache(self) -> TTLCache[bytes, bool]:
        return TTLCache(maxsize=self.max_entries, ttl=self.ttl, timer=self.clock.seconds)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        key = hashlib.sha256(f"{audience}\0{token}".encode()).digest()
        if key in self._rejected:
            return fail(TokenRejected("rejected recently"))
        waiting = self._in_flight.get(key)
        answer: Deferred[Identity] = Deferred()
        if waiting is not None:
            waiting.append(answer)
            return answer
        self._in_flight[key] = [answer]
        self.validator.validate(token, audience).addBoth(self._settled, key)
        return answer

    def __len__(self) -> int:
        """How many rejections are remembered."""
        return len(self._rejected)

    def _settled(self, result: Identity | Failure, key: bytes) -> None:
        if isinstance(result, Failure) and result.check(TokenRejected):
            self._rejected[key] = True
        for answer in self._in_flight.pop(key):
            # A waiter whose request went away has been cancelled already.
            if answer.called:
                continue
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)


async def caller_identity(
    callers: RejectionCache, authorization: Optional[bytes], audiences: Sequence[str]
) -> Optional[Identity]:
    """
    Who sent a request, by the bearer token of its ``Authorization`` header
    issued for one of ``audiences``; ``None`` when there is no such token or
    the validator rejects it.
    """
    token = bearer_token(authorization)
    if token is None:
        return None
    try:
        return (await validate_for_any(callers, token, audiences)).identity
    except TokenRejected as error:
        log.info("caller rejected: {reason}", reason=str(error))
        return None
