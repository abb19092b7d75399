"""
What a Kubernetes service-account token says, from its claims alone: who it
names (the ``kubernetes.io`` claim of projected tokens, the flat claims of
legacy secret tokens, or a strict ``system:serviceaccount:<ns>:<name>``
subject) and until when it may be used, and the username prefixes that keep
two clusters' accounts apart.  Pure.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping, Optional

import attrs

from jwtlet import jwtverify

if TYPE_CHECKING:
    from jwtlet.config import Config

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# DNS-1123 labels (namespaces) and subdomains (service-account names).
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_LEGACY = "kubernetes.io/serviceaccount/"


@attrs.frozen
class ServiceAccount:
    namespace: str
    name: str
    uid: Optional[str] = None

    @property
    def username(self) -> str:
        return f"{SERVICE_ACCOUNT_PREFIX}{self.namespace}:{self.name}"

    @property
    def groups(self) -> tuple[str, ...]:
        return ("system:serviceaccounts", f"system:serviceaccounts:{self.namespace}", "system:authenticated")


def valid_namespace(value: object) -> bool:
    return isinstance(value, str) and _NAMESPACE.fullmatch(value) is not None


def valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def from_username(username: object) -> Optional[ServiceAccount]:
    """``system:serviceaccount:<ns>:<name>`` strictly, else ``None``."""
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    parts = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
    if len(parts) != 2 or not valid_namespace(parts[0]) or not valid_name(parts[1]):
        return None
    return ServiceAccount(parts[0], parts[1])


def _uid(value: object) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def from_claims(claims: jwtverify.Claims) -> Optional[ServiceAccount]:
    """The service account of a verified token's claims, or ``None``."""
    subject = from_username(claims.get("sub"))
    nested = claims.get("kubernetes.io")
    if isinstance(nested, Mapping):
        account = nested.get("serviceaccount")
        namespace = nested.get("namespace")
        if not isinstance(account, Mapping) or not valid_namespace(namespace) or not valid_name(account.get("name")):
            return None
        found = ServiceAccount(str(namespace), str(account["name"]), _uid(account.get("uid")))
    elif isinstance(claims.get(_LEGACY + "namespace"), str):
        namespace = claims[_LEGACY + "namespace"]
        name = claims.get(_LEGACY + "service-account.name")
        if not valid_namespace(namespace) or not valid_name(name):
            return None
        found = ServiceAccount(namespace, str(name), _uid(claims.get(_LEGACY + "service-account.uid")))
    elif subject is not None:
        return subject
    else:
        return None
    # When both say who it is, they must agree.
    if subject is not None and (subject.namespace, subject.name) != (found.namespace, found.name):
        return None
    if claims.get("sub") is not None and subject is None:
        return None
    return found


# -- lifetime -------------------------------------------------------------------


def usable_until(claims: jwtverify.Claims, now: float, leeway: float, max_age: float) -> float:
    """
    :func:`jwtlet.jwtverify.usable_until` with one more limit:
    ``kubernetes.io.warnafter``, because Kubernetes stretches ``exp`` of pod
    tokens to a year for clients that do not refresh and marks the real limit
    there.
    """
    nested = claims.get("kubernetes.io")
    warn_after = jwtverify.numeric_date(nested, "warnafter") if isinstance(nested, Mapping) else None
    limits = [(warn_after, "past its kubernetes.io.warnafter")] if warn_after is not None else []
    return jwtverify.usable_until(claims, now, leeway, max_age, limits)


def max_subject_token_age(config: Config) -> float:
    """``token.max_subject_token_age_secs`` of the parsed config."""
    return float(config.token.max_subject_token_age_secs)


def verifier(issuers: Mapping[str, jwtverify.TrustedIssuer], leeway: float, config: Config) -> jwtverify.Verifier:
    """
    The verifier of a JWT validator whose tokens may be Kubernetes pod
    tokens: the config's age limit, and the lifetime of :func:`usable_until`
    (a pod token past its ``kubernetes.io.warnafter`` is as stale to any
    validator that takes it).
    """
    return jwtverify.Verifier(issuers, leeway=leeway, max_age=max_subject_token_age(config), lifetime=usable_until)


# -- username prefixes ----------------------------------------------------------


def distinct_prefix_problems(prefixes: list[tuple[str, str]]) -> list[str]:
    """
    With several issuers, the same ``system:serviceaccount:<ns>:<name>`` in
    two clusters must become two identities: every ``(path, prefix)`` must be
    unique (so at most one is empty).
    """
    if len(prefixes) < 2:
        return []
    problems = []
    seen: dict[str, str] = {}
    for path, prefix in prefixes:
        if prefix in seen:
            problems.append(f"{path}: {prefix!r} is also the prefix of {seen[prefix]}; with several issuers "
                            "each needs its own, or one cluster's service accounts act as another's")
        else:
            seen[prefix] = path
    return problems
