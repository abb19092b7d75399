"""
In-memory stand-ins for plugin providers, for tests of the core and of
users' own code: a validator that knows a fixed set of tokens, and a switch
that takes any provider down as an outage of its backing service would.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from jwtlet.interfaces import DependencyUnavailable, IValidator, TokenRejected
from jwtlet.model import Identity


def service_account(namespace: str, name: str, issuer: str = "https://kubernetes.test") -> Identity:
    return Identity(
        username=f"system:serviceaccount:{namespace}:{name}",
        issuer=issuer,
        uid=f"uid-{namespace}-{name}",
        namespace=namespace,
        name=name,
        groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
    )


@implementer(IValidator)
@attrs.define
class StaticValidator:
    """
    Accepts exactly the tokens it was given, each for one audience.  ``down``
    makes every call fail as a dependency outage would.
    """

    tokens: dict[str, tuple[Identity, str]] = attrs.field(factory=dict)
    down: bool = False
    calls: int = 0

    def add(self, token: str, identity: Identity, audience: str) -> None:
        self.tokens[token] = (identity, audience)

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        self.calls += 1
        if self.down:
            return fail(DependencyUnavailable("validator down"))
        known = self.tokens.get(token)
        if known is None:
            return fail(TokenRejected("unknown token"))
        identity, expected = known
        if audience is not None and audience != expected:
            return fail(TokenRejected("wrong audience"))
        return succeed(identity)


@attrs.define
class Interruptible:
    """
    Any provider (a store, a signer) behind a switch: while ``down``, every
    method call fails with :class:`DependencyUnavailable`, as it does when
    the database or service behind the provider is unreachable.
    """

    provider: Any
    down: bool = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.provider, name)
        # Dunder attributes (zope's ``__provides__`` among them) describe the
        # provider; only its methods are interrupted.
        if name.startswith("__") or not self.down or not callable(method):
            return method
        return self._unavailable

    def _unavailable(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(DependencyUnavailable("the provider's backing service is down"))
