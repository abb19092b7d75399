"""
What a Kubernetes service-account token says, from its claims alone: who it
names (the ``kubernetes.io`` claim of projected tokens, the flat claims of
legacy secret tokens, or a strict ``system:serviceaccount:<ns>:<name>``
subject) and until when it may be used.  Also what both Kubernetes validators
share about their peers: how JSON a hostile peer wrote is read, and which
URLs they may connect to.  Pure.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

import attrs

from jwtlet.config.schema import is_loopback_host
from jwtlet.interfaces import TokenRejected

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


def valid_namespace(value: Any) -> bool:
    return isinstance(value, str) and _NAMESPACE.fullmatch(value) is not None


def valid_name(value: Any) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def from_username(username: Any) -> Optional[ServiceAccount]:
    """``system:serviceaccount:<ns>:<name>`` strictly, else ``None``."""
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    parts = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
    if len(parts) != 2 or not valid_namespace(parts[0]) or not valid_name(parts[1]):
        return None
    return ServiceAccount(parts[0], parts[1])


def _uid(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def from_claims(claims: Mapping[str, Any]) -> Optional[ServiceAccount]:
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


# -- hostile JSON ---------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 §4 / RFC 7519 §4: parsers that keep the first and parsers that
    # keep the last member would disagree about what was signed.
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member")
    return members


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes) -> Any:
    """
    JSON from a token, a JWKS or a discovery document, where every way it can
    be hostile is a ``ValueError``: invalid UTF-8, duplicate members,
    ``NaN``/``Infinity``, integers past Python's digit limit, and nesting too
    deep for the parser (``RecursionError`` otherwise).
    """
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# -- lifetime -------------------------------------------------------------------

#: NumericDates past this (year 2286) are nonsense, and would make float
#: arithmetic on them meaningless.
_LAST_DATE = 1e13


def numeric_date(claims: Mapping[str, Any], name: str) -> Optional[float]:
    """A NumericDate claim, ``None`` when absent; anything else is a rejection."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < _LAST_DATE:
        raise TokenRejected(f"'{name}' is not a NumericDate")
    return float(value)


def usable_until(claims: Mapping[str, Any], now: float, leeway: float, max_age: float) -> float:
    """
    The instant a token's claims stop it being usable (leeway not included),
    or :class:`TokenRejected` when it is not usable at ``now``.

    That is the earliest of ``exp``; ``kubernetes.io.warnafter``, because
    Kubernetes stretches ``exp`` of pod tokens to a year for clients that do
    not refresh and marks the real limit there; and ``iat`` plus ``max_age``.
    A token without ``iat`` is refused: its age cannot be bounded, and the
    tokens that lack it (legacy secret-based ones, which have no ``exp``
    either) are exactly the never-expiring credentials the bound is for.
    """
    expires = numeric_date(claims, "exp")
    if expires is None:
        raise TokenRejected("no 'exp'")
    issued = numeric_date(claims, "iat")
    if issued is None:
        raise TokenRejected("no 'iat'")
    if now + leeway < issued:
        raise TokenRejected("issued in the future")
    not_before = numeric_date(claims, "nbf")
    if not_before is not None and now + leeway < not_before:
        raise TokenRejected("not yet valid")
    limits = [(expires, "expired"), (issued + max_age, "older than token.max_subject_token_age_secs")]
    nested = claims.get("kubernetes.io")
    warn_after = numeric_date(nested, "warnafter") if isinstance(nested, Mapping) else None
    if warn_after is not None:
        limits.append((warn_after, "past its kubernetes.io.warnafter"))
    for limit, reason in limits:
        if now > limit + leeway:
            raise TokenRejected(reason)
    return min(limit for limit, _ in limits)


def max_subject_token_age(config: Any) -> float:
    """``token.max_subject_token_age_secs`` of the parsed config."""
    return float(config.token.max_subject_token_age_secs)


# -- username prefixes ----------------------------------------------------------


def prefix_problem(value: Any) -> Optional[str]:
    """Why ``username_prefix`` is unusable, or ``None``."""
    return None if isinstance(value, str) else "must be a string"


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


# -- outbound URLs --------------------------------------------------------------


def outbound_url_problem(url: Any, dev: bool) -> Optional[str]:
    """
    Why jwtlet must not connect to ``url``, or ``None``: it must be https,
    or http to a loopback host, or http anywhere in ``--dev``.  Plain http
    elsewhere would let anyone on the path swap the keys or read the bearer
    token sent with the request.
    """
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        host = parts.hostname if parts is not None else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = host = None
    if parts is None or parts.scheme not in ("https", "http") or not host:
        return "must be an absolute https URL"
    if parts.scheme == "http" and not (dev or is_loopback_host(host)):
        return "must be https (http only to a loopback host or with --dev)"
    return None
