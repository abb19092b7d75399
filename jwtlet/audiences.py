"""
Several expected audiences (migration.md, Mozambigue): ``client_audience``
may list audiences, and a credential is accepted when it was issued for any
of them.

Validators answer for one audience at a time (the plugin interface), so a
credential is checked against each in the configured order until one
accepts it.  Only a rejection moves on to the next audience: an outage of
the validator's backing service is the answer at once, never a reason to
try another audience (nor to call a credential invalid).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence

import attrs
from twisted.internet.defer import Deferred

from jwtlet.interfaces import TokenRejected
from jwtlet.model import Identity


class AudienceValidator(Protocol):
    """What :func:`validate_for_any` asks of a validator (the typed adapter, or a cache in front of it)."""

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]: ...


@attrs.frozen
class Accepted:
    """Whose credential it is, and the audience it was accepted for (``None``: none was asked)."""

    identity: Identity
    audience: Optional[str]


async def validate_for_any(validator: AudienceValidator, token: str, audiences: Sequence[str]) -> Accepted:
    """
    ``token`` validated for the first of ``audiences`` it was issued for (for
    no particular audience when there are none); :class:`TokenRejected` when
    every one rejects it.
    """
    if not audiences:
        return Accepted(await validator.validate(token, None), None)
    *earlier, last = audiences
    for audience in earlier:
        try:
            return Accepted(await validator.validate(token, audience), audience)
        except TokenRejected:
            continue
    # The last audience's rejection, if it comes, is the answer.
    return Accepted(await validator.validate(token, last), last)
