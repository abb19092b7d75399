"""
What one ``jwt-authenticator`` entry makes of a verified token's claims, with
the semantics of Kubernetes' structured authentication configuration
(``AuthenticationConfiguration`` ``jwt[]``, workload-identity.md): the claim
validation rules, the claim mappings to a user (username, groups, uid,
extra), and the user validation rules.  Pure: the signature, issuer, times
and audiences were checked before (:mod:`jwtlet.jwtverify`).

Every expression was compiled when the configuration loaded
(:mod:`jwtlet.cel`); here they are only evaluated, and every failure -- a rule
that is false, an expression that fails to evaluate or yields the wrong type,
a claim that is missing or not a string -- is a :class:`TokenRejected` whose
message is for the log only.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import attrs

from jwtlet.cel import CelEvaluationError, Expression, evaluate, evaluate_bool, prepare
from jwtlet.interfaces import TokenRejected
from jwtlet.jwtverify import Claims
from jwtlet.model import JSONValue

#: The variable claim expressions read (``claims.sub``), as in Kubernetes.
CLAIMS_VARIABLES = frozenset({"claims"})
#: The variable user validation rules read (``user.username``), as in Kubernetes.
USER_VARIABLES = frozenset({"user"})


@attrs.frozen
class RequiredClaim:
    """``claim`` + ``requiredValue``: the claim must be the string ``required_value`` (``""`` when not given)."""

    claim: str
    required_value: str = ""


@attrs.frozen
class Rule:
    """``expression`` (+ ``message``): must evaluate to ``true``."""

    expression: Expression
    message: str = ""


ClaimRule = Union[RequiredClaim, Rule]


@attrs.frozen
class FromClaim:
    """A mapping that copies one claim; ``prefix`` is prepended (``username`` and ``groups`` only)."""

    claim: str
    prefix: str = ""


#: A mapping's source: a claim, or an expression over ``claims``.
Source = Union[FromClaim, Expression]


@attrs.frozen
class ExtraMapping:
    key: str
    value: Expression


@attrs.frozen
class ClaimMappings:
    username: Source
    groups: Optional[Source] = None
    uid: Optional[Source] = None
    extra: tuple[ExtraMapping, ...] = ()


@attrs.frozen
class Rules:
    """The rules and mappings of one ``jwt[]`` entry (its ``issuer`` table lives with the keys)."""

    mappings: ClaimMappings
    claim_rules: tuple[ClaimRule, ...] = ()
    user_rules: tuple[Rule, ...] = ()


@attrs.frozen
class User:
    """The mapped user: Kubernetes' ``UserInfo``."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def as_cel(self) -> dict[str, JSONValue]:
        """``user`` as userValidationRules see it (every field present, as Kubernetes fills them)."""
        return {"username": self.username, "uid": self.uid, "groups": list(self.groups),
                "extra": {key: list(values) for key, values in self.extra.items()}}


def authenticate(rules: Rules, claims: Claims) -> User:
    """The user ``claims`` map to under ``rules``, or :class:`TokenRejected`."""
    context = _context({"claims": dict(claims)})
    for rule in rules.claim_rules:
        _check_claim_rule(rule, claims, context)
    mappings = rules.mappings
    user = User(
        username=_username(mappings.username, claims, context),
        uid=_uid(mappings.uid, claims, context),
        groups=_groups(mappings.groups, claims, context),
        extra=_extra(mappings.extra, context),
    )
    if rules.user_rules:
        user_context = _context({"user": user.as_cel()})
        for rule in rules.user_rules:
            _check(rule, user_context, "user validation rule")
    return user


def overlapping_prefix_problems(prefixes: list[tuple[str, str]]) -> list[str]:
    """
    workload-identity.md: authenticators must map to disjoint usernames.  Of
    ``(path, prefix)`` for each ``username.claim`` mapping, two overlap when
    one prefix starts the other (``""`` starts every one): the same claim
    value from two issuers could then be one username.
    """
    problems = []
    for index, (path, prefix) in enumerate(prefixes):
        for earlier_path, earlier in prefixes[:index]:
            if prefix.startswith(earlier) or earlier.startswith(prefix):
                problems.append(f"{path}: {prefix!r} overlaps the prefix {earlier!r} of {earlier_path}; "
                                "each authenticator's usernames need a prefix no other one starts with")
                break
    return problems


# -- rules --------------------------------------------------------------------


def _context(variables: Mapping[str, JSONValue]) -> JSONValue:
    try:
        return prepare(variables)
    except Exception:  # whatever a hostile claim set does to the conversion, it is a rejection
        raise TokenRejected("claims not usable by expressions") from None


def _check_claim_rule(rule: ClaimRule, claims: Claims, context: JSONValue) -> None:
    if isinstance(rule, Rule):
        _check(rule, context, "claim validation rule")
        return
    if rule.claim not in claims:
        raise TokenRejected(f"required claim {rule.claim!r} not present")
    if claims[rule.claim] != rule.required_value:
        raise TokenRejected(f"required claim {rule.claim!r} does not have its required value")


def _check(rule: Rule, context: JSONValue, what: str) -> None:
    try:
        passed = evaluate_bool(rule.expression, context)
    except CelEvaluationError as error:
        raise TokenRejected(f"{what} {rule.expression.source!r} failed to evaluate: {error}") from None
    if not passed:
        raise TokenRejected(f"{what} {rule.expression.source!r} is false: {rule.message or 'no message'}")


def _value(expression: Expression, context: JSONValue, what: str) -> JSONValue:
    try:
        return evaluate(expression, context)
    except CelEvaluationError as error:
        raise TokenRejected(f"claimMappings.{what} failed to evaluate: {error}") from None


# -- mappings -----------------------------------------------------------------


def _string_claim(claims: Claims, claim: str, what: str) -> str:
    value = claims.get(claim)
    if not isinstance(value, str):
        problem = "missing" if value is None else "not a string"
        raise TokenRejected(f"claimMappings.{what}: claim {claim!r} is {problem}")
    return value


def _username(source: Source, claims: Claims, context: JSONValue) -> str:
    if isinstance(source, FromClaim):
        username = source.prefix + _string_claim(claims, source.claim, "username")
        # Kubernetes: an email is an identity only if the issuer did not say it is unverified.
        if source.claim == "email" and claims.get("email_verified", True) is not True:
            raise TokenRejected("claimMappings.username: email not verified")
    else:
        value = _value(source, context, "username")
        if not isinstance(value, str):
            raise TokenRejected("claimMappings.username must evaluate to a string")
        username = value
    # A caller must be someone: an empty name would match no mapping but could match a role.
    if not username:
        raise TokenRejected("claimMappings.username is empty")
    return username


def _uid(source: Optional[Source], claims: Claims, context: JSONValue) -> str:
    if source is None:
        return ""
    if isinstance(source, FromClaim):
        return _string_claim(claims, source.claim, "uid")
    value = _value(source, context, "uid")
    if not isinstance(value, str):
        raise TokenRejected("claimMappings.uid must evaluate to a string")
    return value


def _groups(source: Optional[Source], claims: Claims, context: JSONValue) -> tuple[str, ...]:
    if source is None:
        return ()
    if isinstance(source, FromClaim):
        if source.claim not in claims:
            return ()
        # A single string is one group, as Kubernetes allows ("role" claims).
        groups = string_list(claims[source.claim], keep_empty=True)
        if groups is None:
            raise TokenRejected(f"claimMappings.groups: claim {source.claim!r} is not a string or a list of strings")
        return tuple(source.prefix + group for group in groups)
    groups = string_list(_value(source, context, "groups"))
    if groups is None:
        raise TokenRejected("claimMappings.groups must evaluate to a string or a list of strings")
    return groups


def _extra(mappings: tuple[ExtraMapping, ...], context: JSONValue) -> dict[str, tuple[str, ...]]:
    extra = {}
    for mapping in mappings:
        values = string_list(_value(mapping.value, context, f"extra[{mapping.key!r}]"))
        if values is None:
            raise TokenRejected(f"claimMappings.extra[{mapping.key!r}] must evaluate to a string or a list of strings")
        if values:  # "", [] and null: the key is absent
            extra[mapping.key] = values
    return extra


def string_list(value: JSONValue, keep_empty: bool = False) -> Optional[tuple[str, ...]]:
    """
    A string or list of strings as a tuple (``None``: neither), Kubernetes'
    way for groups and extra expressions: ``null`` is empty, and empty strings
    are dropped unless ``keep_empty`` (a groups claim is copied as it is).
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if items is None or not all(isinstance(item, str) for item in items):
        return None
    return tuple(item for item in items if keep_empty or item)
