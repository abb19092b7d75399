"""
The trust rules security.md sets on the ext_authz front's own validator, over
what validators say of themselves (:class:`ITrustedIssuers`), so the core
names no validator: the front must name an audience when its validator checks
``aud`` only if given one; ``source_issuers`` must pick among the issuers it
trusts when it trusts several; and with ``exchange: jwt`` its identities meet
the top-level mappings, so an issuer it trusts beside the top-level
validator's needs its own username prefix.  Pure: the wiring asks the built
validators and reports what these functions find.
"""

from __future__ import annotations

from typing import Optional, Sequence

from jwtlet.config.schema import ExtAuthzConfig
from jwtlet.interfaces import ITrustedIssuers, TrustedIssuer

TOP = "validator"
FRONT = "ext_authz.validator"


def front_problems(settings: ExtAuthzConfig, front: Optional[ITrustedIssuers]) -> list[str]:
    """The front's ``audience`` and ``source_issuers`` against what its validator trusts."""
    if front is None:
        return []
    problems = []
    if front.needs_explicit_audience and settings.audience is None:
        problems.append(
            f"ext_authz.audience: required when the ext_authz validator is {settings.validator.type} "
            "(a token minted for another relying party must never be swapped)"
        )
    trusted = [entry.issuer for entry in front.trusted_issuers()]
    if settings.source_issuers is None and len(trusted) > 1:
        problems.append("ext_authz.source_issuers: required when the ext_authz validator trusts more than one issuer")
    elif settings.source_issuers is not None:
        problems.extend(
            f"ext_authz.source_issuers: '{name}' is not one of {FRONT}.issuers"
            for name in settings.source_issuers
            if trusted and name not in trusted
        )
    return problems


def _same_space(a: TrustedIssuer, b: TrustedIssuer) -> bool:
    """One identity space: the same issuer, vouched for by the same authority."""
    return (a.issuer, a.authority) == (b.issuer, b.authority)


def prefixes_across_validators(top: Sequence[TrustedIssuer], front: Sequence[TrustedIssuer]) -> list[str]:
    """
    security.md: an ext_authz validator beside the top-level one makes two
    trust domains when they trust different issuers.  With ``exchange: jwt``
    its identities meet the top-level mappings, so the same service account
    name from each must become two identities.  (Within one validator the
    plugin checks its own issuers; ``kubernetes-tokenrequest`` maps
    identities by ``source_issuers`` instead.)  An issuer both trust with the
    same prefix is one identity space and needs nothing.
    """
    problems = []
    for entry in front:
        if entry.username_prefix is None:
            continue
        clash = next((earlier for earlier in top
                      if earlier.username_prefix == entry.username_prefix and not _same_space(earlier, entry)), None)
        if clash is not None:
            problems.append(
                f"{FRONT}.{entry.key_path}: {entry.username_prefix!r} is also the prefix of {TOP}.{clash.key_path} "
                "for another issuer; each trusted issuer needs its own, or one cluster's service accounts act as "
                "another's"
            )
    return problems


def source_issuers(settings: ExtAuthzConfig, front: Optional[ITrustedIssuers]) -> Optional[frozenset[str]]:
    """
    The issuers whose identities the TokenRequest exchange may map: those
    configured, else every issuer the front's validator says it trusts (the
    config allows leaving them out only when it trusts one), so an identity
    from anywhere else is denied even if a validator let one through.
    ``None`` (everything the validator accepts) only for a validator that
    says nothing about whom it trusts.
    """
    if settings.source_issuers is not None:
        return frozenset(settings.source_issuers)
    if front is None:
        return None
    return frozenset(entry.issuer for entry in front.trusted_issuers())
