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


@attrs.frozen
class K8sConfig:
    api_server_url: Optional[str] = None
    cluster_issuer: str = "https://kubernetes.default.svc.cluster.local"
    token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


@attrs.frozen
class TokenConfig:
    client_audience: str
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
    client_audience: Optional[str] = None


@attrs.frozen
class ApiKeyProfile:
    name: str
    audience: str
    ttl_secs: int


@attrs.frozen
class ApiKeysConfig:
    prefix: str = "jwtk"
    profiles: Mapping[str, ApiKeyProfile] = attrs.field(factory=dict)


@attrs.frozen
class TargetCluster:
    api_server_url: str
    token_file: str
    ca_file: Optional[str]
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
class LoggingConfig:
    format: str = "json"
    level: str = "info"


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
    management: ManagementConfig = ManagementConfig()
    service_accounts: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    api_keys: Optional[ApiKeysConfig] = None
    ext_authz: Optional[ExtAuthzConfig] = None
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    #: top-level tables owned by plugins (vault-transit's ``vault``), as written: their owner checks them
    tables: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    dev: bool = False
    data_dir: Path = Path(DEFAULT_DATA_DIR)

    @property
    def management_client_audience(self) -> str:
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


