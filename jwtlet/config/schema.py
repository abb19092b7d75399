"""
The shape of config.md: one frozen attrs class per section, built only by
:func:`jwtlet.config.parse` (nothing downstream reads the raw mapping), and
:class:`KnownPlugins`, what discovery found, against which ``type`` names and
plugin-owned top-level tables are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import attrs

from jwtlet.config.reader import SectionReader, as_nonempty_str

DEFAULT_DATA_DIR = "jwtlet-data"

#: The documented defaults of config.md (plugin names an operator may rely on by omitting ``type``).
DEFAULT_STORE = "sqlite"
DEFAULT_VALIDATOR = "kubernetes-tokenreview"


@attrs.frozen
class PluginSection:
    """A config section that names a plugin (``type``) and its options."""

    type: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    section: str = ""

    @classmethod
    def read(cls, parent: SectionReader, key: str, default_type: Any) -> PluginSection:
        """
        The section at ``key``: its ``type`` (``default_type``, or
        ``reader.REQUIRED`` when there is none) and every other key as the
        plugin's options, which the plugin checks itself.
        """
        section = parent.table(key)
        kind = section.get("type", as_nonempty_str, default_type)
        options = section.rest()
        section.finish()
        return cls(type=kind or "", options=options, section=section.path)


#: client-go's in-cluster config: the pod's own service-account token and the cluster's CA.
IN_CLUSTER_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


@attrs.frozen
class ClusterAccess:
    """
    How one config table says to reach an API server (``None``: not said):
    its explicit keys win over its kubeconfig (migration.md, Tokensmith), and
    what it leaves unsaid comes from the next table, then in-cluster
    (:func:`jwtlet.kubernetes.kubeconfig.resolve`).
    """

    api_server_url: Optional[str] = None
    token_file: Optional[str] = None
    ca_file: Optional[str] = None
    kubeconfig: Optional[str] = None
    context: Optional[str] = None


@attrs.frozen
class K8sConfig:
    api_server_url: Optional[str] = None
    cluster_issuer: str = "https://kubernetes.default.svc.cluster.local"
    token_file: str = IN_CLUSTER_TOKEN_FILE
    ca_file: str = IN_CLUSTER_CA_FILE
    kubeconfig: Optional[str] = None
    context: Optional[str] = None

    def access(self) -> ClusterAccess:
        """
        This table as a layer: ``token_file`` and ``ca_file`` at their
        in-cluster defaults are the in-cluster layer itself, so a kubeconfig
        beside them supplies the credential and the CA.
        """
        return ClusterAccess(
            api_server_url=self.api_server_url,
            token_file=self.token_file if self.token_file != IN_CLUSTER_TOKEN_FILE else None,
            ca_file=self.ca_file if self.ca_file != IN_CLUSTER_CA_FILE else None,
            kubeconfig=self.kubeconfig,
            context=self.context,
        )


def audience_list(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``client_audience`` as written, a string or a list (Mozambigue's several audiences), as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class TokenConfig:
    #: subject tokens must have been issued for one of these
    client_audience: tuple[str, ...] = attrs.field(converter=audience_list)
    audience: str
    participant_context_claim: str = "jwtlet_pc"
    token_ttl_secs: int = 3600
    require_subject_token_type: bool = False
    reject_replayed_subject_tokens: bool = False
    max_subject_token_age_secs: int = 86400


@attrs.frozen
class LimitsConfig:
    max_connections: int = 1024


@attrs.frozen
class RateLimits:
    per_client_per_sec: Optional[float] = None
    global_per_sec: Optional[float] = None


@attrs.frozen
class ManagementConfig:
    client_audience: Optional[tuple[str, ...]] = attrs.field(
        default=None, converter=attrs.converters.optional(audience_list))


@attrs.frozen
class ApiKeyProfile:
    name: str
    audience: str
    ttl_secs: int
    #: the ``iss`` of this profile's tokens (``None``: the top-level ``issuer``)
    issuer: Optional[str] = None
    #: claims every token of this profile carries (M-Lab's ``org``), never a reserved one
    claims: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ApiKeysConfig:
    prefix: str = "jwtk"
    profiles: Mapping[str, ApiKeyProfile] = attrs.field(factory=dict)


@attrs.frozen
class TargetCluster:
    """``ext_authz.target_cluster``: where TokenRequest goes (``access``), and what it asks for."""

    access: ClusterAccess
    audiences: tuple[str, ...]
    expiration_secs: int


@attrs.frozen
class ExtAuthzConfig:
    grpc_endpoint: Optional[str]
    http: bool
    validator: PluginSection
    audience: Optional[str]
    exchange: str
    target_cluster: Optional[TargetCluster]
    resource_header: str
    source_issuers: Optional[tuple[str, ...]] = None


@attrs.frozen
class MetricsConfig:
    enabled: bool = True


@attrs.frozen
class TracingConfig:
    """observability.md: OpenTelemetry traces over OTLP/HTTP (the ``otel`` extra)."""

    enabled: bool = False
    #: the collector's base URL; ``None``: the ``OTEL_EXPORTER_OTLP_*`` variables, else ``http://127.0.0.1:4318``
    endpoint: Optional[str] = None
    service_name: str = "jwtlet"
    #: parent-based: an incoming sampled ``traceparent`` is always honoured
    sample_ratio: float = 1.0


@attrs.frozen
class LoggingConfig:
    format: str = "json"
    #: ``None``: not set, so ``JWTLET_LOG_LEVEL``, then ``RUST_LOG``, then ``info`` decide (migration.md)
    level: Optional[str] = None


@attrs.frozen
class Config:
    issuer: str
    token: TokenConfig
    storage_backend: PluginSection
    validator: PluginSection
    signer: PluginSection
    bind: str = "0.0.0.0"  # noqa: S104 - the documented default; --dev binds loopback
    token_exchange_port: int = 8080
    management_port: int = 8081
    token_exchange_endpoint: Optional[str] = None
    management_endpoint: Optional[str] = None
    plugin_dirs: tuple[str, ...] = ()
    k8s: K8sConfig = K8sConfig()
    rate_limits: RateLimits = RateLimits()
    limits: LimitsConfig = LimitsConfig()
    #: processes serving the ports (``"auto"`` is resolved to the CPU count when read)
    workers: int = 1
    management: ManagementConfig = ManagementConfig()
    service_accounts: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    api_keys: Optional[ApiKeysConfig] = None
    ext_authz: Optional[ExtAuthzConfig] = None
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    #: top-level tables owned by plugins (vault-transit's ``vault``), as written: their owner checks them
    tables: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    dev: bool = False
    data_dir: Path = Path(DEFAULT_DATA_DIR)

    @property
    def management_client_audience(self) -> tuple[str, ...]:
        return self.management.client_audience or self.token.client_audience

    def token_exchange_description(self) -> str:
        """The Twisted endpoint description of the token exchange site."""
        return self.token_exchange_endpoint or _tcp(self.token_exchange_port, self.bind)

    def management_description(self) -> str:
        """The Twisted endpoint description of the management site."""
        return self.management_endpoint or _tcp(self.management_port, self.bind)


def _tcp(port: int, interface: str) -> str:
    # Endpoint descriptions escape ':' in IPv6 literals.
    return f"tcp:{port}:interface={interface.replace(':', chr(92) + ':')}"


# -- what discovery found -------------------------------------------------------


@attrs.frozen
class KnownPlugins:
    """
    What discovery found, for checking ``type`` names: plugin names by kind
    (``store``, ``validator``, ``signer``), by module why a plugin module
    failed to import, and which plugin owns which top-level table (a factory's
    ``table`` attribute): ``{"vault": ("signer", "vault-transit")}``.
    """

    names: Mapping[str, frozenset[str]]
    failures: Mapping[str, str] = attrs.field(factory=dict)
    tables: Mapping[str, tuple[str, str]] = attrs.field(factory=dict)

    def import_failures(self) -> str:
        return "; ".join(f"{module}: {reason}" for module, reason in sorted(self.failures.items()))


