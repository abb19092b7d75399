"""
The ext_authz front's trust rules over what its validator says it trusts
(``ITrustedIssuers``): which identities the TokenRequest exchange may map when
``source_issuers`` is left out.  The config rules themselves are tested at
check-config level (tests/test_check_config.py, tests/test_attack_extauthz.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
import pytest_twisted
from zope.interface import implementer

from jwtlet.config.schema import ExtAuthzConfig, PluginSection
from jwtlet.extauthz.decide import TokenRequestExchange
from jwtlet.extauthz.trust import source_issuers
from jwtlet.interfaces import ITrustedIssuers, TrustedIssuer
from jwtlet.metrics import Metrics
from jwtlet.model import Identity

CLUSTER = "https://kubernetes.default.svc.cluster.local"


@implementer(ITrustedIssuers)
@attrs.frozen
class OneCluster:
    needs_explicit_audience = False

    def trusted_issuers(self) -> Sequence[TrustedIssuer]:
        return (TrustedIssuer(CLUSTER, "", "username_prefix"),)


class UnreachableTarget:
    """The target cluster: an identity that must be denied never gets this far."""

    async def token_for(self, issuer: str, namespace: str, name: str, uid: Optional[str]) -> None:
        raise AssertionError("the target cluster was asked for a token")


def front(configured: Optional[tuple[str, ...]]) -> ExtAuthzConfig:
    return ExtAuthzConfig(grpc_endpoint=None, http=True, validator=PluginSection("kubernetes-tokenreview", {}),
                          audience=None, exchange="kubernetes-tokenrequest", target_cluster=None,
                          resource_header="x-jwtlet-resource", source_issuers=configured)


def test_configured_source_issuers_win_and_a_silent_validator_maps_everyone() -> None:
    assert source_issuers(front(("https://a",)), OneCluster()) == frozenset({"https://a"})
    assert source_issuers(front(None), None) is None


@pytest_twisted.ensureDeferred
async def test_an_identity_from_an_issuer_the_validator_does_not_trust_is_never_swapped() -> None:
    """
    A validator with a bug lets through an identity of an issuer it does not trust; source_issuers is left out
    (it trusts one issuer): the TokenRequest exchange still denies 403 and never asks the target cluster.
    """
    mapped = source_issuers(front(None), OneCluster())
    exchange = TokenRequestExchange(UnreachableTarget(), Metrics(), mapped)  # type: ignore[arg-type]
    stranger = Identity(username="system:serviceaccount:apps:web", issuer="https://elsewhere", namespace="apps",
                        name="web")
    decision = await exchange.exchange(stranger, None)
    assert (decision.allowed, decision.status, decision.reason) == (False, 403, "not from a source issuer")
