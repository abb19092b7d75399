"""
The configuration: load YAML or TOML, layer ``JWTLET__A__B`` environment
overrides and the ``--dev`` defaults, and check the result into frozen attrs
classes.  Every problem is collected and reported together, each with its key
path; nothing downstream reads the raw mapping.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

from jwtlet.policy import RESERVED_CLAIMS

T = TypeVar("T")

ENV_PREFIX = "JWTLET__"
CONFIG_FILE_ENV = "JWTLET_CONFIG_FILE"

DEV_ISSUER = "https://kubernetes.dev.jwtlet.invalid"
DEV_CLIENT_AUDIENCE = "jwtlet-dev"
DEV_AUDIENCE = "jwtlet-dev-service"
DEV_ADMIN = "system:serviceaccount:jwtlet:admin"
DEV_ISSUER_JWKS = "dev-issuer.jwks.json"
DEV_ISSUER_KEY = "dev-issuer.jwk"
DEFAULT_DATA_DIR = "jwtlet-data"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# -- the parsed configuration -------------------------------------------------


@attrs.frozen
class PluginSection:
    """A config section that names a plugin (``type``) and its options."""

    type: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    section: str = ""


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
    vault: Optional[Mapping[str, Any]] = None
    management: ManagementConfig = ManagementConfig()
    service_accounts: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    api_keys: Optional[ApiKeysConfig] = None
    ext_authz: Optional[ExtAuthzConfig] = None
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
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


# -- reading raw mappings with collected errors -------------------------------


_MISSING = object()


class _Section:
    """
    Reads one table of the raw config, recording each problem under its key
    path and remembering which keys were read so the rest can be reported
    as unknown.
    """

    def __init__(self, raw: Any, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.problem("", "must be a table")
            raw = {}
        self.raw: Mapping[str, Any] = raw
        self.read: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else (self.path or key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.key_path(key)}: {message}")

    def get(
        self,
        key: str,
        kind: Callable[[Any], T],
        default: Any = _MISSING,
        check: Optional[Callable[[T], Optional[str]]] = None,
    ) -> Any:
        """
        The value at ``key`` converted by ``kind`` (which raises ``ValueError``
        with a message), ``default`` when absent; a required key has no default.
        """
        self.read.add(key)
        value = self.raw.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(key, "required")
                return None
            return default
        try:
            converted = kind(value)
        except ValueError as error:
            self.problem(key, str(error))
            return default if default is not _MISSING else None
        if check is not None:
            message = check(converted)
            if message:
                self.problem(key, message)
        return converted

    def table(self, key: str) -> _Section:
        self.read.add(key)
        return _Section(self.raw.get(key), self.key_path(key), self.problems)

    def present(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def rest(self) -> dict[str, Any]:
        """Keys not read yet, for plugin options."""
        rest = {k: v for k, v in self.raw.items() if k not in self.read}
        self.read.update(rest)
        return rest

    def finish(self) -> None:
        for key in self.raw:
            if key not in self.read:
                self.problem(str(key), "unknown key")


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")
    return value


def as_nonempty_str(value: Any) -> str:
    text = as_str(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {type(value).__name__}")
    return value


def as_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    return float(value)


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {type(value).__name__}")
    return value


def as_str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def in_range(low: float, high: float) -> Callable[[float], Optional[str]]:
    def check(value: float) -> Optional[str]:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def positive(value: float) -> Optional[str]:
    return None if value > 0 else "must be greater than 0"


def is_loopback_host(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def https_url(dev: bool) -> Callable[[str], Optional[str]]:
    """
    The outbound URL rule of security.md: ``https``, or ``http`` only to a
    loopback host or in ``--dev`` (a token sent in clear to anywhere else
    could be read on the way).
    """

    def check(url: str) -> Optional[str]:
        parts = urlsplit(url)
        if not parts.netloc or parts.scheme not in ("https", "http"):
            return "must be an absolute https URL"
        if parts.scheme == "http" and not (dev or is_loopback_host(parts.hostname)):
            return "must be https (http is allowed only for loopback hosts or with --dev)"
        return None

    return check


# -- sources: file, environment, dev defaults ------------------------------------


def read_file(path: Path) -> Mapping[str, Any]:
    """Parse a YAML or TOML config file by its extension."""
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text.decode("utf-8"))
        elif suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text)
        else:
            raise ConfigError([f"{path}: unknown config format (use .yaml, .yml or .toml)"])
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: not valid {suffix[1:].upper()}: {error}"]) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"{path}: the top level must be a table"])
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """
    ``JWTLET__A__B=value`` as ``{"a": {"b": value}}``, values parsed as YAML
    scalars (so ``9090`` is an int and ``true`` a bool).
    """
    tree: dict[str, Any] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            continue
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError:
            value = environ[name]
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return tree


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` over ``base`` (tables merge, anything else replaces)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dev_defaults(data_dir: Path) -> dict[str, Any]:
    """The complete embedded configuration of ``--dev``."""
    return {
        "issuer": "http://127.0.0.1:8080",
        "bind": "127.0.0.1",
        "storage_backend": {"type": "sqlite", "path": str(data_dir / "jwtlet.sqlite3")},
        "validator": {
            "type": "kubernetes-oidc",
            "issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / DEV_ISSUER_JWKS)}],
        },
        "token": {"client_audience": DEV_CLIENT_AUDIENCE, "audience": DEV_AUDIENCE},
        "signer": {
            "type": "local-key",
            "key_file": str(data_dir / "signing-key.jwk"),
            "generate": True,
        },
        "service_accounts": {DEV_ADMIN: ["management:write"]},
    }


def load_raw(
    path: Optional[str],
    environ: Mapping[str, str],
    dev: bool,
    data_dir: Path,
) -> dict[str, Any]:
    """The raw mapping from the dev defaults, the file and the environment, in that order."""
    raw: dict[str, Any] = dev_defaults(data_dir) if dev else {}
    path = path or environ.get(CONFIG_FILE_ENV) or None
    if path:
        raw = merge(raw, read_file(Path(path)))
    return merge(raw, env_overrides(environ))


def load(
    path: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    dev: bool = False,
    data_dir: Optional[str] = None,
    known_plugins: Optional[KnownPlugins] = None,
) -> Config:
    """Load and check the configuration; raises :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    directory = Path(data_dir or DEFAULT_DATA_DIR)
    raw = load_raw(path, environ, dev, directory)
    return parse(raw, dev=dev, data_dir=directory, known_plugins=known_plugins)


# -- the schema -----------------------------------------------------------------


def parse(
    raw: Mapping[str, Any],
    dev: bool = False,
    data_dir: Path = Path(DEFAULT_DATA_DIR),
    known_plugins: Optional[KnownPlugins] = None,
) -> Config:
    """
    Check a raw mapping against the schema of ``config.md``.  With
    ``known_plugins``, every ``type`` must name a plugin that was found.
    """
    problems: list[str] = []
    top = _Section(raw, "", problems)

    issuer = top.get("issuer", as_nonempty_str, check=https_url(dev))
    bind = top.get("bind", as_nonempty_str, "0.0.0.0")  # noqa: S104
    ports = in_range(1, 65535)
    token_port = top.get("token_exchange_port", as_int, 8080, ports)
    management_port = top.get("management_port", as_int, 8081, ports)
    if token_port is not None and token_port == management_port:
        top.problem("management_port", f"must differ from token_exchange_port ({token_port})")
    token_endpoint = top.get("token_exchange_endpoint", as_nonempty_str, None)
    management_endpoint = top.get("management_endpoint", as_nonempty_str, None)
    plugin_dirs = top.get("plugin_dirs", as_str_list, ())

    storage = _plugin_section(top, "storage_backend", "sqlite")
    k8s = _k8s(top.table("k8s"), dev)
    validator = _plugin_section(top, "validator", "kubernetes-tokenreview")
    token = _token(top.table("token"))
    rate_limits = _rate_limits(top.table("rate_limits"))
    limits = _limits(top.table("limits"))
    vault = top.get("vault", _as_table, None)
    signer = _plugin_section(top, "signer", "vault-transit" if vault is not None else None)
    management = _management(top.table("management"))
    service_accounts = top.get("service_accounts", _as_roles, {})
    api_keys = _optional(top, "api_keys", _api_keys)
    ext_authz = _optional(top, "ext_authz", lambda section: _ext_authz(section, dev))
    metrics = _metrics(top.table("metrics"))
    logging = _logging(top.table("logging"))
    top.finish()

    if k8s.api_server_url is None and TOKENREVIEW in _validator_types(validator, ext_authz):
        problems.append(f"k8s.api_server_url: required by the {TOKENREVIEW} validator")
    problems.extend(_api_server_urls(validator, ext_authz, dev))
    problems.extend(_plugin_requirements(storage, signer, vault))
    if ext_authz is not None and ext_authz.exchange == "jwt":
        problems.extend(_prefixes_across_validators(validator, ext_authz.validator, k8s))
    if known_plugins is not None:
        problems.extend(_unknown_types(known_plugins, storage, validator, signer, ext_authz))
    if dev and not is_loopback_host(bind):
        problems.append(f"bind: --dev listens on loopback only, not {bind}")
    if problems:
        raise ConfigError(problems)
    assert issuer is not None and token is not None
    return Config(
        issuer=issuer.rstrip("/"),
        bind=bind,
        token_exchange_port=token_port,
        management_port=management_port,
        token_exchange_endpoint=token_endpoint,
        management_endpoint=management_endpoint,
        plugin_dirs=plugin_dirs,
        storage_backend=storage,
        k8s=k8s,
        validator=validator,
        token=token,
        rate_limits=rate_limits,
        limits=limits,
        signer=signer,
        vault=vault,
        management=management,
        service_accounts=service_accounts,
        api_keys=api_keys,
        ext_authz=ext_authz,
        metrics=metrics,
        logging=logging,
        dev=dev,
        data_dir=data_dir,
    )


TOKENREVIEW = "kubernetes-tokenreview"
OIDC = "kubernetes-oidc"
POSTGRES = "postgres"
VAULT_TRANSIT = "vault-transit"
VAULT_CREDENTIALS = ("token", "token_file", "kubernetes_auth")


def _api_server_urls(validator: PluginSection, ext_authz: Optional[ExtAuthzConfig], dev: bool) -> list[str]:
    """
    A validator's own ``api_server_url`` (the TokenReview option) is an
    outbound URL that gets our service-account token: the https rule holds.
    A value that is not a string is left to the plugin to report.
    """
    sections = [("validator", validator)]
    if ext_authz is not None:
        sections.append(("ext_authz.validator", ext_authz.validator))
    problems = []
    for path, section in sections:
        url = section.options.get("api_server_url")
        message = https_url(dev)(url) if isinstance(url, str) else None
        if message:
            problems.append(f"{path}.api_server_url: {message}")
    return problems


def _plugin_requirements(
    storage: PluginSection, signer: PluginSection, vault: Optional[Mapping[str, Any]]
) -> list[str]:
    """
    The plugin options config.md names among the load-time rules, checked
    here so that they are listed with every other problem (the plugins'
    own checks only run once the core configuration is valid).
    """
    problems = []
    if storage.type == POSTGRES and not storage.options.get("url"):
        problems.append(f"storage_backend.url: required for the {POSTGRES} store")
    if signer.type == VAULT_TRANSIT:
        # vault-transit reads the top-level ``vault`` table and the signer section together.
        options = {**(vault or {}), **signer.options}
        if not options.get("url"):
            problems.append(f"vault.url: required for {VAULT_TRANSIT}")
        given = [key for key in VAULT_CREDENTIALS if options.get(key) is not None]
        if len(given) != 1:
            problems.append(f"vault: give exactly one of {', '.join(VAULT_CREDENTIALS)} "
                            f"(given: {', '.join(given) or 'none'})")
    return problems


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


def _prefixes_across_validators(top: PluginSection, ext_authz: PluginSection, k8s: K8sConfig) -> list[str]:
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


@attrs.frozen
class KnownPlugins:
    """
    What discovery found, for checking ``type`` names: plugin names by kind
    (``store``, ``validator``, ``signer``) and, by module, why a plugin module
    failed to import.
    """

    names: Mapping[str, frozenset[str]]
    failures: Mapping[str, str] = attrs.field(factory=dict)


def _validator_types(validator: PluginSection, ext_authz: Optional[ExtAuthzConfig]) -> set[str]:
    types = {validator.type}
    if ext_authz is not None and "api_server_url" not in ext_authz.validator.options:
        types.add(ext_authz.validator.type)
    return types


def _unknown_types(
    known: KnownPlugins,
    storage: PluginSection,
    validator: PluginSection,
    signer: PluginSection,
    ext_authz: Optional[ExtAuthzConfig],
) -> list[str]:
    wanted = [("store", "storage_backend", storage), ("validator", "validator", validator),
              ("signer", "signer", signer)]
    if ext_authz is not None:
        wanted.append(("validator", "ext_authz.validator", ext_authz.validator))
    problems = []
    for kind, path, section in wanted:
        names = known.names.get(kind, frozenset())
        if not section.type or section.type in names:
            continue
        if known.failures:
            # A module that failed to import cannot say which plugins it held,
            # so every import failure is named: one of them is the likely cause.
            reasons = "; ".join(f"{module}: {reason}" for module, reason in sorted(known.failures.items()))
            problems.append(f"{path}.type: plugin '{section.type}' not loaded (import failures: {reasons})")
        else:
            problems.append(
                f"{path}.type: no {kind} plugin named '{section.type}' "
                f"(found: {', '.join(sorted(names)) or 'none'})"
            )
    return problems


def _optional(top: _Section, key: str, parse_table: Callable[[_Section], T]) -> Optional[T]:
    """A table that switches a feature on by being present."""
    if not top.present(key):
        top.read.add(key)
        return None
    return parse_table(top.table(key))


def _as_table(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a table")
    return dict(value)


def _as_roles(value: Any) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a table of identity -> list of roles")
    roles: dict[str, tuple[str, ...]] = {}
    for identity, granted in value.items():
        if not isinstance(granted, (list, tuple)) or not all(isinstance(r, str) for r in granted):
            raise ValueError(f"{identity}: must be a list of role names")
        roles[str(identity)] = tuple(granted)
    return roles


def _plugin_section(top: _Section, key: str, default_type: Optional[str]) -> PluginSection:
    section = top.table(key)
    kind = section.get("type", as_nonempty_str, default_type if default_type is not None else _MISSING)
    options = section.rest()
    section.finish()
    return PluginSection(type=kind or "", options=options, section=key)


def _k8s(section: _Section, dev: bool) -> K8sConfig:
    defaults = K8sConfig()
    url = section.get("api_server_url", as_nonempty_str, None, https_url(dev))
    config = K8sConfig(
        api_server_url=url.rstrip("/") if url else None,
        cluster_issuer=section.get("cluster_issuer", as_nonempty_str, defaults.cluster_issuer),
        token_file=section.get("token_file", as_nonempty_str, defaults.token_file),
        ca_file=section.get("ca_file", as_nonempty_str, defaults.ca_file),
    )
    section.finish()
    return config


def _not_reserved(name: str) -> Optional[str]:
    return f"'{name}' is a reserved claim name" if name in RESERVED_CLAIMS else None


def _token(section: _Section) -> Optional[TokenConfig]:
    client_audience = section.get("client_audience", as_nonempty_str)
    audience = section.get("audience", as_nonempty_str)
    claim = section.get("participant_context_claim", as_nonempty_str, "jwtlet_pc", _not_reserved)
    ttl = section.get("token_ttl_secs", as_int, 3600, in_range(1, 86400))
    strict = section.get("require_subject_token_type", as_bool, False)
    replay = section.get("reject_replayed_subject_tokens", as_bool, False)
    max_age = section.get("max_subject_token_age_secs", as_int, 86400, positive)
    section.finish()
    if client_audience is None or audience is None:
        return None
    return TokenConfig(client_audience, audience, claim, ttl, strict, replay, max_age)


def _rate_limits(section: _Section) -> RateLimits:
    limits = RateLimits(
        per_client_per_sec=section.get("per_client_per_sec", as_number, None, positive),
        global_per_sec=section.get("global_per_sec", as_number, None, positive),
    )
    section.finish()
    return limits


def _limits(section: _Section) -> LimitsConfig:
    limits = LimitsConfig(max_connections=section.get("max_connections", as_int, 1024, positive))
    section.finish()
    return limits


def _management(section: _Section) -> ManagementConfig:
    config = ManagementConfig(client_audience=section.get("client_audience", as_nonempty_str, None))
    section.finish()
    return config


def _api_keys(section: _Section) -> ApiKeysConfig:
    prefix = section.get("prefix", as_nonempty_str, "jwtk", _no_dots)
    profiles_section = section.table("profiles")
    profiles = {}
    for name in list(profiles_section.raw):
        profile = profiles_section.table(str(name))
        audience = profile.get("audience", as_nonempty_str)
        ttl = profile.get("ttl_secs", as_int, 3600, in_range(1, 86400))
        profile.finish()
        if audience is not None:
            profiles[str(name)] = ApiKeyProfile(str(name), audience, ttl)
    profiles_section.finish()
    section.finish()
    return ApiKeysConfig(prefix=prefix, profiles=profiles)


def _no_dots(value: str) -> Optional[str]:
    return "must not contain '.'" if "." in value else None


def _ext_authz(section: _Section, dev: bool) -> Optional[ExtAuthzConfig]:
    grpc_endpoint = section.get("grpc_endpoint", as_nonempty_str, None)
    http = section.get("http", as_bool, True)
    validator = _plugin_section(section, "validator", "kubernetes-tokenreview")
    audience = section.get("audience", as_nonempty_str, None)
    exchange = section.get(
        "exchange",
        as_nonempty_str,
        "kubernetes-tokenrequest",
        lambda v: None if v in ("kubernetes-tokenrequest", "jwt") else "must be kubernetes-tokenrequest or jwt",
    )
    target = None
    if exchange == "kubernetes-tokenrequest":
        target = _target_cluster(section.table("target_cluster"), dev)
    else:
        section.get("target_cluster", _as_table, None)
    header = section.get("resource_header", as_nonempty_str, "x-jwtlet-resource")
    source_issuers = section.get("source_issuers", as_str_list, None)
    if validator.type == OIDC and audience is None:
        section.problem("audience", f"required when the ext_authz validator is {OIDC} "
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


def _target_cluster(section: _Section, dev: bool) -> Optional[TargetCluster]:
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


def _metrics(section: _Section) -> MetricsConfig:
    config = MetricsConfig(enabled=section.get("enabled", as_bool, True))
    section.finish()
    return config


def _logging(section: _Section) -> LoggingConfig:
    config = LoggingConfig(
        format=section.get(
            "format", as_str, "json", lambda v: None if v in ("json", "text") else "must be json or text"
        ),
        level=section.get(
            "level",
            as_str,
            "info",
            lambda v: None
            if v.lower() in ("debug", "info", "warn", "warning", "error", "critical")
            else "must be debug, info, warn, error or critical",
        ),
    )
    section.finish()
    return config
