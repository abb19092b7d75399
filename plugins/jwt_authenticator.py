"""
The ``jwt-authenticator`` validator: any OIDC workload identity (GitHub
Actions, GitLab CI, SPIFFE JWT-SVIDs, another cluster's service accounts),
configured exactly as Kubernetes' structured authentication configuration
describes its ``jwt`` authenticators (workload-identity.md).

The token checks are the ones ``kubernetes-oidc`` makes, from the same code
(:mod:`jwtlet.jwtverify`, :mod:`jwtlet.jwks`); the rules and mappings are
:mod:`jwtlet.authenticator`.  This module reads the options -- every CEL
expression compiled here, its problems named by field path -- and turns a
mapped user into the caller's :class:`Identity`: the mapped username is who
the caller is, everywhere.

Slightly over 400 lines because Kubernetes' ``AuthenticationConfiguration``
has that many fields and rules to check; the evaluation itself lives in
:mod:`jwtlet.authenticator`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet import authenticator, interfaces
from jwtlet.authenticator import CLAIMS_VARIABLES, USER_VARIABLES, FromClaim, Rules, Source, overlapping_prefix_problems
from jwtlet.cel import CelCompileError, Expression, compile_expression
from jwtlet.config.reader import REQUIRED, SectionReader, as_str, https_url
from jwtlet.files import write_private
from jwtlet.interfaces import (
    IReadiness,
    ITrustedIssuers,
    IValidator,
    IValidatorFactory,
    PluginConfigError,
    PluginContext,
    TokenRejected,
)
from jwtlet.jwks import RemoteKeys
from jwtlet.jwtverify import Timing, TrustedIssuer, Verifier, token_audiences
from jwtlet.kubernetes import identity
from jwtlet.model import Identity
from jwtlet.outbound import build_http_client

__all__ = ["JWTAuthenticator", "JWTAuthenticatorFactory", "jwt_authenticator"]

log = Logger(namespace="jwtlet.validator.jwt_authenticator")

MATCH_ANY = "MatchAny"
# Kubernetes checks these on the expression's syntax tree; the CEL package
# jwtlet uses exposes none, so the select expressions are found in the source.
_USES_EMAIL = re.compile(r"\bclaims\s*\.\s*email\b")
_USES_EMAIL_VERIFIED = re.compile(r"\bclaims\s*\.\s*email_verified\b")
_KUBERNETES_DOMAINS = ("kubernetes.io", "k8s.io")
_DOMAIN_PREFIXED_PATH = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]+")


@attrs.frozen
class Authenticator:
    """One ``jwt[]`` entry as the validator uses it: the audiences it accepts and its rules."""

    audiences: frozenset[str]
    rules: Rules


@implementer(IValidator, IReadiness, ITrustedIssuers)
@attrs.frozen
class JWTAuthenticator:
    """Tokens of the configured issuers, each mapped to a user by its entry's rules."""

    verifier: Verifier
    authenticators: Mapping[str, Authenticator]
    reactor: IReactorTime
    trusted: tuple[interfaces.TrustedIssuer, ...] = ()

    #: Every entry checks its own ``issuer.audiences``, whatever the front asks.
    needs_explicit_audience = False

    def trusted_issuers(self) -> tuple[interfaces.TrustedIssuer, ...]:
        return self.trusted

    def validate(self, token: str, audience: Optional[str]) -> Deferred[Identity]:
        return ensureDeferred(self._validate(token, audience))

    async def _validate(self, token: str, audience: Optional[str]) -> Identity:
        verified = await self.verifier.verify(token, audience, self.reactor.seconds())
        issuer = verified.issuer.issuer
        entry = self.authenticators[issuer]
        # audienceMatchPolicy MatchAny (the only policy Kubernetes has): one is enough.
        if not any(isinstance(aud, str) and aud in entry.audiences for aud in token_audiences(verified.claims)):
            raise TokenRejected("no audience of issuer.audiences")
        user = authenticator.authenticate(entry.rules, verified.claims)
        token_id = verified.claims.get("jti")
        return Identity(
            username=user.username,
            issuer=issuer,
            uid=user.uid or None,
            groups=user.groups,
            extra={key: list(values) for key, values in user.extra.items()},
            claims=verified.claims,
            expires_at=verified.usable_until,
            token_id=token_id if isinstance(token_id, str) else None,
            accepted_until=verified.usable_until + self.verifier.leeway,
        )

    def check_ready(self) -> Deferred[None]:
        return ensureDeferred(self.verifier.check_ready(self.reactor.seconds()))


# -- options: the Kubernetes shape ----------------------------------------------


def _as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("must be a list")
    return value


def _as_nonempty_list(value: Any) -> list[Any]:
    if not _as_list(value):
        raise ValueError("must list at least one authenticator")
    return value


def _entries(section: SectionReader, key: str, required: bool = False) -> list[SectionReader]:
    """A reader for each table of the list at ``key`` (absent and not ``required``: none)."""
    readers = []
    items = section.get(key, _as_nonempty_list, REQUIRED) if required else section.get(key, _as_list, [])
    for index, raw in enumerate(items or []):
        path = f"{key}[{index}]"
        if not isinstance(raw, Mapping):
            section.problem(path, "must be a table")
            continue
        readers.append(SectionReader(raw, section.key_path(path), section.problems))
    return readers


def _compile(section: SectionReader, key: str, source: str, variables: frozenset[str]) -> Optional[Expression]:
    try:
        return compile_expression(source, variables)
    except CelCompileError as error:
        section.problem(key, str(error))
        return None


def _url(section: SectionReader, key: str, dev: bool, required: bool) -> Optional[str]:
    url: Optional[str] = section.get(key, as_str) if required else section.get(key, as_str, None)
    if url is None:
        return None
    problem = https_url(dev)(url)
    try:
        parts = urlsplit(url)
        if problem is None and (parts.username is not None or parts.password is not None):
            problem = "must not contain a username or password"
        elif problem is None and (parts.query or parts.fragment):
            problem = "must not contain a query or a fragment"
    except ValueError:
        problem = problem or "must be an absolute https URL"
    if problem is not None:
        section.problem(key, problem)
        return None
    return url


def _audiences(issuer: SectionReader) -> frozenset[str]:
    audiences = issuer.get("audiences", _as_list)
    if audiences is None:
        return frozenset()
    if not audiences:
        issuer.problem("audiences", "at least one audience is required")
    for index, audience in enumerate(audiences):
        if not isinstance(audience, str) or not audience:
            issuer.problem(f"audiences[{index}]", "must be a non-empty string")
        elif audiences.index(audience) != index:
            issuer.problem(f"audiences[{index}]", f"{audience!r} is listed twice")
    policy = issuer.get("audienceMatchPolicy", as_str, "")
    if len(audiences) > 1 and policy != MATCH_ANY:
        issuer.problem("audienceMatchPolicy", "must be MatchAny for multiple audiences")
    elif policy not in ("", MATCH_ANY):
        issuer.problem("audienceMatchPolicy", "must be empty or MatchAny for a single audience")
    return frozenset(audience for audience in audiences if isinstance(audience, str) and audience)


def _certificate_authority(issuer: SectionReader) -> Optional[bytes]:
    pem: Optional[str] = issuer.get("certificateAuthority", as_str, None)
    if not pem:
        return None
    try:
        x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        issuer.problem("certificateAuthority", "must be PEM-encoded CA certificates")
        return None
    return pem.encode()


def _claim_rules(entry: SectionReader) -> tuple[authenticator.ClaimRule, ...]:
    rules: list[authenticator.ClaimRule] = []
    seen: set[str] = set()
    for rule in _entries(entry, "claimValidationRules"):
        claim = rule.get("claim", as_str, "")
        required_value = rule.get("requiredValue", as_str, "")
        source = rule.get("expression", as_str, "")
        message = rule.get("message", as_str, "")
        rule.finish()
        if claim and source:
            rule.problem("", "claim and expression can't both be set")
        elif not claim and not source:
            rule.problem("", "claim or expression is required")
        elif claim:
            if message:
                rule.problem("message", "may not be specified when claim is set")
            if claim in seen:
                rule.problem("claim", f"{claim!r} has a rule already")
            seen.add(claim)
            rules.append(authenticator.RequiredClaim(claim, required_value))
        else:
            if required_value:
                rule.problem("requiredValue", "may not be specified when expression is set")
            compiled = _compile(rule, "expression", source, CLAIMS_VARIABLES)
            if compiled is not None:
                rules.append(authenticator.Rule(compiled, message))
    return tuple(rules)


def _source(mappings: SectionReader, key: str, prefixed: bool, required: bool) -> Optional[Source]:
    """``username``/``groups`` (claim + prefix, or expression) and ``uid`` (claim or expression)."""
    table = mappings.table(key)
    claim = table.get("claim", as_str, "")
    source = table.get("expression", as_str, "")
    prefix: Optional[str] = table.get("prefix", as_str, None) if prefixed else None
    table.finish()
    if claim and source:
        table.problem("", "claim and expression can't both be set")
        return None
    if source:
        if prefix is not None:
            table.problem("prefix", "may not be specified when expression is set")
        return _compile(table, "expression", source, CLAIMS_VARIABLES)
    if not claim:
        if required:
            table.problem("", "claim or expression is required")
        return None
    if prefixed and prefix is None:
        table.problem("prefix", 'required when claim is set (it may be "" to add none)')
        return None
    return FromClaim(claim, prefix or "")


def _extra(mappings: SectionReader) -> tuple[authenticator.ExtraMapping, ...]:
    extra = []
    keys: set[str] = set()
    for mapping in _entries(mappings, "extra"):
        key = mapping.get("key", as_str)
        source = mapping.get("valueExpression", as_str)
        mapping.finish()
        if key is None or source is None:
            continue
        if _DOMAIN_PREFIXED_PATH.fullmatch(key.lower()) is None:
            mapping.problem("key", "must be a domain-prefixed path (example.org/foo)")
        elif key != key.lower():
            mapping.problem("key", "must be lowercase")
        elif any(key.split("/")[0] == domain or key.split("/")[0].endswith("." + domain)
                 for domain in _KUBERNETES_DOMAINS):
            # Mappings trust these keys to come from Kubernetes (TokenReview's pod name, say).
            mapping.problem("key", "k8s.io, kubernetes.io and their subdomains are reserved for Kubernetes use")
        elif key in keys:
            mapping.problem("key", f"{key!r} is mapped twice")
        keys.add(key)
        compiled = _compile(mapping, "valueExpression", source, CLAIMS_VARIABLES)
        if compiled is not None:
            extra.append(authenticator.ExtraMapping(key, compiled))
    return tuple(extra)


def _user_rules(entry: SectionReader) -> tuple[authenticator.Rule, ...]:
    rules = []
    for rule in _entries(entry, "userValidationRules"):
        source = rule.get("expression", as_str)
        message = rule.get("message", as_str, "")
        rule.finish()
        compiled = _compile(rule, "expression", source, USER_VARIABLES) if source is not None else None
        if compiled is not None:
            rules.append(authenticator.Rule(compiled, message))
    return tuple(rules)


def _email_problem(entry: SectionReader, mappings: SectionReader) -> None:
    """
    Kubernetes: a username expression reading ``claims.email`` must be paired
    with a check of ``claims.email_verified`` somewhere, or anybody's
    unverified address becomes an identity.
    """
    username = mappings.raw.get("username")
    source = username.get("expression") if isinstance(username, Mapping) else None
    if not isinstance(source, str) or not _USES_EMAIL.search(source):
        return
    sources = [source]
    for key, field in (("claimValidationRules", "expression"), ("extra", "valueExpression")):
        table = entry.raw if key == "claimValidationRules" else mappings.raw
        items = table.get(key)
        sources += [str(item.get(field)) for item in (items if isinstance(items, list) else [])
                    if isinstance(item, Mapping)]
    if not any(_USES_EMAIL_VERIFIED.search(text) for text in sources):
        mappings.problem("username.expression", "claims.email_verified must be used in claimMappings.username."
                         "expression, claimMappings.extra[*].valueExpression or claimValidationRules[*].expression "
                         "when claims.email is used in claimMappings.username.expression")


@attrs.frozen
class _Entry:
    url: str
    discovery_url: Optional[str]
    certificate_authority: Optional[bytes]
    authenticator: Authenticator
    username: Source


def _entry(entry: SectionReader, dev: bool) -> Optional[_Entry]:
    issuer = entry.table("issuer")
    url = _url(issuer, "url", dev, required=True)
    discovery_url = _url(issuer, "discoveryURL", dev, required=False)
    if url is not None and discovery_url is not None and url.rstrip("/") == discovery_url.rstrip("/"):
        issuer.problem("discoveryURL", "must be different from url")
    audiences = _audiences(issuer)
    certificate_authority = _certificate_authority(issuer)
    issuer.finish()
    claim_rules = _claim_rules(entry)
    mappings = entry.table("claimMappings")
    username = _source(mappings, "username", prefixed=True, required=True)
    groups = _source(mappings, "groups", prefixed=True, required=False)
    uid = _source(mappings, "uid", prefixed=False, required=False)
    extra = _extra(mappings)
    mappings.finish()
    _email_problem(entry, mappings)
    user_rules = _user_rules(entry)
    entry.finish()
    if url is None or username is None:
        return None
    rules = Rules(authenticator.ClaimMappings(username, groups, uid, extra), claim_rules, user_rules)
    return _Entry(url, discovery_url, certificate_authority, Authenticator(audiences, rules), username)


def _distinct(entries: list[tuple[str, _Entry]], problems: list[str]) -> None:
    """Issuer URLs and discovery URLs are unique across authenticators, as in Kubernetes."""
    seen: dict[tuple[str, str], str] = {}
    for path, entry in entries:
        for key, url in (("url", entry.url), ("discoveryURL", entry.discovery_url)):
            if url is None:
                continue
            if (key, url) in seen:
                problems.append(f"{path}.issuer.{key}: also the {key} of {seen[(key, url)]}")
            seen.setdefault((key, url), path)


def _http_client(context: PluginContext, certificate_authority: Optional[bytes]) -> HTTPClient:
    """
    The daemon's client, or one trusting ``certificateAuthority``.  The
    outbound client takes extra CAs as a file: the PEM text is kept in the
    data directory under its digest (nothing is written by check-config).
    """
    if certificate_authority is None:
        return context.http_client if context.http_client is not None else build_http_client(context.reactor)
    path = context.data_dir / "jwt-authenticator" / f"ca-{hashlib.sha256(certificate_authority).hexdigest()}.pem"
    if not context.check_only and not path.exists():
        write_private(path, certificate_authority)
    return build_http_client(context.reactor, ca_file=str(path))


@implementer(IPlugin, IValidatorFactory)
@attrs.frozen
class JWTAuthenticatorFactory:
    name: str = "jwt-authenticator"
    description: str = "validates OIDC workload identities configured as Kubernetes' jwt authenticators"

    def build(self, options: Mapping[str, Any], context: PluginContext) -> JWTAuthenticator:
        problems: list[str] = []
        section = SectionReader(options, "", problems)
        timing = Timing.read(section)
        ttl, leeway = timing.jwks_cache_ttl_secs, timing.leeway_secs
        readers = _entries(section, "jwt", required=True)
        section.finish()
        entries = [(reader.path, parsed) for reader in readers
                   if (parsed := _entry(reader, context.config.dev)) is not None]
        _distinct(entries, problems)
        problems.extend(overlapping_prefix_problems([
            (f"{path}.claimMappings.username.prefix", entry.username.prefix)
            for path, entry in entries if isinstance(entry.username, FromClaim)]))
        if problems:
            raise PluginConfigError(*problems)
        issuers = {
            entry.url: TrustedIssuer(entry.url, RemoteKeys(
                issuer=entry.url, jwks_uri=None, http_client=_http_client(context, entry.certificate_authority),
                reactor=context.reactor, ttl=ttl, dev=context.config.dev, metrics=context.metrics, log=log,
                discovery_url=entry.discovery_url))
            for _, entry in entries
        }
        verifier = identity.verifier(issuers, leeway, context.config)
        trusted = tuple(
            interfaces.TrustedIssuer(
                issuer=entry.url,
                # An expression-made username has no prefix jwtlet can compare:
                # keeping those apart is the operator's (workload-identity.md).
                username_prefix=entry.username.prefix if isinstance(entry.username, FromClaim) else None,
                key_path=f"{path.removeprefix('.')}.claimMappings.username.prefix",
                authority=entry.discovery_url,
            )
            for path, entry in entries
        )
        return JWTAuthenticator(verifier, {entry.url: entry.authenticator for _, entry in entries}, context.reactor,
                                trusted)


jwt_authenticator = JWTAuthenticatorFactory()
