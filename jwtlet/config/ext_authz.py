"""
The ``ext_authz`` table (ext-authz.md) and the trust rules security.md sets
on a second validator: its audience, which issuers it maps, and distinct
username prefixes when its identities meet the top-level mappings.

Some of these rules still read the kubernetes validators' options
(``issuers``, ``api_server_url``, ``username_prefix``) and name
kubernetes-oidc: they span the ext_authz table and two plugin sections, so
they can move into the plugins only once a validator can say whom it trusts
and whether it checks ``aud`` itself.
"""

from __future__ import annotations

from typing import Any, Mapping

from jwtlet.config.reader import (
    SectionReader,
    as_bool,
    as_int,
    as_nonempty_str,
    as_str_list,
    as_table,
    https_url,
    one_of,
)
from jwtlet.config.schema import DEFAULT_VALIDATOR, ExtAuthzConfig, K8sConfig, PluginSection, TargetCluster

#: the ext_authz exchange that is not a plugin: TokenRequest against the target cluster
TOKENREQUEST_EXCHANGE = "kubernetes-tokenrequest"


def _issuer_entries(section: PluginSection) -> list[Any]:
    """The ``issuers`` list of a validator section (empty when it has none)."""
    issuers = section.options.get("issuers")
    return list(issuers) if isinstance(issuers, list) else []


def _trusted(section: PluginSection, path: str, k8s: K8sConfig) -> list[tuple[str, str, str]]:
    """
    ``(where, issuer, username_prefix)`` for each issuer a validator section
    trusts: each ``issuers`` entry, else the one cluster it asks (its own
    ``api_server_url`` or ``k8s.api_server_url``).
    """
    entries = _issuer_entries(section)
    if entries:
        return [
            (f"{path}.issuers[{index}].username_prefix", str(entry.get("issuer")),
             str(entry.get("username_prefix") or ""))
            for index, entry in enumerate(entries)
            if isinstance(entry, Mapping)
        ]
    cluster = section.options.get("api_server_url") or k8s.api_server_url or ""
    return [(f"{path}.username_prefix", str(cluster), str(section.options.get("username_prefix") or ""))]


def prefixes_across_validators(top: PluginSection, ext_authz: PluginSection, k8s: K8sConfig) -> list[str]:
    """
    security.md: an ext_authz validator beside the top-level one makes two
    trust domains when they trust different issuers.  With ``exchange: jwt``
    its identities meet the top-level mappings, so the same service account
    name from each must become two identities.  (Within one validator the
    plugin checks its own ``issuers``; ``kubernetes-tokenrequest`` maps
    identities by ``source_issuers`` instead.)  An issuer both trust with the
    same prefix is one identity space and needs nothing.
    """
    seen: dict[str, tuple[str, str]] = {}
    problems = []
    for where, issuer, prefix in _trusted(top, "validator", k8s) + _trusted(ext_authz, "ext_authz.validator", k8s):
        earlier = seen.get(prefix)
        if earlier is None:
            seen[prefix] = (where, issuer)
        elif earlier[1] != issuer and where.startswith("ext_authz.") and not earlier[0].startswith("ext_authz."):
            problems.append(
                f"{where}: {prefix!r} is also the prefix of {earlier[0]} for another issuer; each trusted "
                "issuer needs its own, or one cluster's service accounts act as another's"
            )
    return problems



#: security.md names this validator: it checks ``aud`` itself, so the front must say which audience.
_AUDIENCE_CHECKING_VALIDATOR = "kubernetes-oidc"


def read_ext_authz(section: SectionReader, dev: bool) -> ExtAuthzConfig:
    grpc_endpoint = section.get("grpc_endpoint", as_nonempty_str, None)
    http = section.get("http", as_bool, True)
    validator = PluginSection.read(section, "validator", DEFAULT_VALIDATOR)
    audience = section.get("audience", as_nonempty_str, None)
    exchange = section.get("exchange", as_nonempty_str, TOKENREQUEST_EXCHANGE, one_of(TOKENREQUEST_EXCHANGE, "jwt"))
    target = None
    if exchange == TOKENREQUEST_EXCHANGE:
        target = _target_cluster(section.table("target_cluster"), dev)
    else:
        section.get("target_cluster", as_table, None)
    header = section.get("resource_header", as_nonempty_str, "x-jwtlet-resource")
    source_issuers = section.get("source_issuers", as_str_list, None)
    if validator.type == _AUDIENCE_CHECKING_VALIDATOR and audience is None:
        section.problem("audience", f"required when the ext_authz validator is {_AUDIENCE_CHECKING_VALIDATOR} "
                        "(a token minted for another relying party must never be swapped)")
    trusted = [entry.get("issuer") for entry in _issuer_entries(validator) if isinstance(entry, Mapping)]
    if source_issuers is None and len(trusted) > 1:
        section.problem("source_issuers", "required when the ext_authz validator trusts more than one issuer")
    elif source_issuers is not None:
        if not source_issuers:
            section.problem("source_issuers", "must name at least one issuer")
        for name in source_issuers:
            if trusted and name not in trusted:
                section.problem("source_issuers", f"'{name}' is not one of ext_authz.validator.issuers")
    section.finish()
    return ExtAuthzConfig(
        grpc_endpoint=grpc_endpoint,
        http=http,
        validator=validator,
        audience=audience,
        exchange=exchange,
        target_cluster=target,
        resource_header=header.lower(),
        source_issuers=source_issuers,
    )


def _target_cluster(section: SectionReader, dev: bool) -> TargetCluster:
    url = section.get("api_server_url", as_nonempty_str, check=https_url(dev))
    target = TargetCluster(
        api_server_url=(url or "").rstrip("/"),
        token_file=section.get("token_file", as_nonempty_str, K8sConfig().token_file),
        ca_file=section.get("ca_file", as_nonempty_str, None),
        audiences=section.get("audiences", as_str_list, ("https://kubernetes.default.svc",)),
        expiration_secs=section.get(
            "expiration_secs",
            as_int,
            3600,
            lambda v: None if v >= 600 else "must be at least 600 (Kubernetes refuses less)",
        ),
    )
    section.finish()
    return target


