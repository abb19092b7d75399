"""
The ``ext_authz`` table (ext-authz.md).  The trust rules security.md sets on
its validator (its audience, which issuers it maps, distinct username
prefixes) need to know whom that validator trusts, which only the built
validator can say: :mod:`jwtlet.extauthz.trust` applies them where the
providers are built (``jwtlet.daemon.wiring.find_problems``).
"""

from __future__ import annotations

from jwtlet.config.reader import (
    REQUIRED,
    SectionReader,
    as_bool,
    as_int,
    as_nonempty_str,
    as_str_list,
    as_table,
    https_url,
    one_of,
)
from jwtlet.config.schema import (
    DEFAULT_VALIDATOR,
    ClusterAccess,
    ExtAuthzConfig,
    PluginSection,
    TargetCluster,
)
from jwtlet.kubernetes import kubeconfig

#: the ext_authz exchange that is not a plugin: TokenRequest against the target cluster
TOKENREQUEST_EXCHANGE = "kubernetes-tokenrequest"


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
    if source_issuers is not None and not source_issuers:
        section.problem("source_issuers", "must name at least one issuer")
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
    path, context = kubeconfig.read_keys(section, dev)
    # A kubeconfig names the server; without one the URL is required (no in-cluster default: the
    # target is another cluster, or this one by a name the operator chose).
    url = section.get("api_server_url", as_nonempty_str, None if path else REQUIRED, check=https_url(dev))
    target = TargetCluster(
        access=ClusterAccess(
            api_server_url=url.rstrip("/") if url else None,
            token_file=section.get("token_file", as_nonempty_str, None),
            ca_file=section.get("ca_file", as_nonempty_str, None),
            kubeconfig=path,
            context=context,
        ),
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


