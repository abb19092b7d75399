"""
Checking a raw mapping against config.md into the classes of
:mod:`jwtlet.config.schema`, every problem collected and named by its key
path.

Plugin options are not checked here: each plugin checks its own section (and
a top-level table it owns, such as vault-transit's ``vault``) when it is
built.  :func:`read` therefore answers a whole :class:`Config` even when it
found problems (a neutral value in place of each broken one), so the daemon
can build the plugins in check mode and list their problems in the same run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar
from urllib.parse import urlsplit

import attrs

from jwtlet.config.errors import ConfigError
from jwtlet.config.ext_authz import read_ext_authz
from jwtlet.config.reader import (
    REQUIRED,
    SectionReader,
    as_bool,
    as_int,
    as_nonempty_str,
    as_number,
    as_str,
    as_str_list,
    as_table,
    https_url,
    in_range,
    is_loopback_host,
    no_dots,
    one_of,
    positive,
)
from jwtlet.config.schema import (
    DEFAULT_DATA_DIR,
    DEFAULT_STORE,
    DEFAULT_VALIDATOR,
    ApiKeyProfile,
    ApiKeysConfig,
    Config,
    ExtAuthzConfig,
    K8sConfig,
    KnownPlugins,
    LimitsConfig,
    LoggingConfig,
    ManagementConfig,
    MetricsConfig,
    PluginSection,
    RateLimits,
    TokenConfig,
    TracingConfig,
)
from jwtlet.kubernetes import kubeconfig
from jwtlet.policy import API_KEY_CLAIMS, RESERVED_CLAIMS

T = TypeVar("T")




def parse(
    raw: Mapping[str, Any],
    dev: bool = False,
    data_dir: Path = Path(DEFAULT_DATA_DIR),
    known_plugins: Optional[KnownPlugins] = None,
) -> Config:
    """The checked configuration; raises :class:`ConfigError` listing every problem."""
    config, problems = read(raw, dev=dev, data_dir=data_dir, known_plugins=known_plugins)
    if problems:
        raise ConfigError(problems)
    return config


def read(
    raw: Mapping[str, Any],
    dev: bool = False,
    data_dir: Path = Path(DEFAULT_DATA_DIR),
    known_plugins: Optional[KnownPlugins] = None,
) -> tuple[Config, list[str]]:
    """
    Check a raw mapping against the schema of ``config.md``: the config (to be
    used only if there are no problems) and every problem found.  With
    ``known_plugins``, every ``type`` must name a plugin that was found, and
    the top-level tables plugins own are accepted.
    """
    problems: list[str] = []
    top = SectionReader(raw, "", problems)
    known = known_plugins or KnownPlugins(names={})

    issuer = top.get("issuer", as_nonempty_str, check=https_url(dev))
    bind = top.get("bind", as_nonempty_str, "0.0.0.0")  # noqa: S104 - the documented default
    ports = in_range(1, 65535)
    token_port = top.get("token_exchange_port", as_int, 8080, ports)
    management_port = top.get("management_port", as_int, 8081, ports)
    if token_port == management_port:
        top.problem("management_port", f"must differ from token_exchange_port ({token_port})")
    token_endpoint = top.get("token_exchange_endpoint", as_nonempty_str, None)
    management_endpoint = top.get("management_endpoint", as_nonempty_str, None)
    plugin_dirs = top.get("plugin_dirs", as_str_list, ())

    storage = PluginSection.read(top, "storage_backend", DEFAULT_STORE)
    k8s = _k8s(top.table("k8s"), dev)
    validator = PluginSection.read(top, "validator", DEFAULT_VALIDATOR)
    token = _token(top.table("token"))
    rate_limits = _rate_limits(top.table("rate_limits"))
    limits = _limits(top.table("limits"))
    workers = top.get("workers", as_workers, 1)
    # A plugin may own a top-level table, never one of the core's.
    owned = [name for name in known.tables if name not in attrs.fields_dict(Config)]
    tables = {name: top.get(name, as_table, {}) for name in owned if top.present(name)}
    signer = PluginSection.read(top, "signer", _owner_of(tables, known, "signer"))
    management = _management(top.table("management"))
    service_accounts = top.get("service_accounts", _as_roles, {})
    api_keys = _optional(top, "api_keys", _api_keys)
    ext_authz = _optional(top, "ext_authz", lambda section: read_ext_authz(section, dev))
    metrics = _metrics(top.table("metrics"))
    logging = _logging(top.table("logging"))
    tracing = _tracing(top.table("tracing"))
    _finish_top(top, known)

    if known_plugins is not None:
        problems.extend(_unknown_types(known_plugins, storage, validator, signer, ext_authz))
    if dev and not is_loopback_host(bind):
        problems.append(f"bind: --dev listens on loopback only, not {bind}")
    config = Config(
        # A broken required value reads as empty: such a config is only ever
        # handed to plugins in check mode, never served with.
        issuer=(issuer or "").rstrip("/"),
        bind=bind,
        token_exchange_port=token_port,
        management_port=management_port,
        token_exchange_endpoint=token_endpoint,
        management_endpoint=management_endpoint,
        plugin_dirs=plugin_dirs,
        storage_backend=storage,
        k8s=k8s,
        validator=validator,
        token=token or TokenConfig(client_audience=(), audience=""),
        rate_limits=rate_limits,
        limits=limits,
        workers=workers,
        signer=signer,
        management=management,
        service_accounts=service_accounts,
        api_keys=api_keys,
        ext_authz=ext_authz,
        metrics=metrics,
        logging=logging,
        tracing=tracing,
        tables=tables,
        dev=dev,
        data_dir=data_dir,
    )
    return config, problems


def _owner_of(tables: Mapping[str, Any], known: KnownPlugins, kind: str) -> Any:
    """
    config.md: the default signer is vault-transit when a ``vault`` table is
    present.  Said generically: the plugin of ``kind`` that owns a present
    top-level table, else none (the type is then required).
    """
    owners = sorted(name for table, (owner_kind, name) in known.tables.items()
                    if owner_kind == kind and table in tables)
    return owners[0] if owners else REQUIRED


def _finish_top(top: SectionReader, known: KnownPlugins) -> None:
    """Unknown top-level keys; one may belong to a plugin module that did not import."""
    for key in top.raw:
        if key in top.read:
            continue
        if known.failures:
            top.problem(str(key), f"unknown key (unless a plugin that failed to import owns it: "
                                  f"{known.import_failures()})")
        else:
            top.problem(str(key), "unknown key")


def _unknown_types(
    known: KnownPlugins,
    storage: PluginSection,
    validator: PluginSection,
    signer: PluginSection,
    ext_authz: Optional[ExtAuthzConfig],
) -> list[str]:
    wanted = [("store", storage), ("validator", validator), ("signer", signer)]
    if ext_authz is not None:
        wanted.append(("validator", ext_authz.validator))
    problems = []
    for kind, section in wanted:
        names = known.names.get(kind, frozenset())
        if not section.type or section.type in names:
            continue
        if known.failures:
            # A module that failed to import cannot say which plugins it held,
            # so every import failure is named: one of them is the likely cause.
            problems.append(f"{section.section}.type: plugin '{section.type}' not loaded "
                            f"(import failures: {known.import_failures()})")
        else:
            problems.append(
                f"{section.section}.type: no {kind} plugin named '{section.type}' "
                f"(found: {', '.join(sorted(names)) or 'none'})"
            )
    return problems


def _optional(top: SectionReader, key: str, parse_table: Callable[[SectionReader], T]) -> Optional[T]:
    """A table that switches a feature on by being present."""
    if not top.present(key):
        top.read.add(key)
        return None
    return parse_table(top.table(key))


def _as_roles(value: Any) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a table of identity -> list of roles")
    roles: dict[str, tuple[str, ...]] = {}
    for identity, granted in value.items():
        if not isinstance(granted, (list, tuple)) or not all(isinstance(r, str) for r in granted):
            raise ValueError(f"{identity}: must be a list of role names")
        roles[str(identity)] = tuple(granted)
    return roles


def _k8s(section: SectionReader, dev: bool) -> K8sConfig:
    defaults = K8sConfig()
    url = section.get("api_server_url", as_nonempty_str, None, https_url(dev))
    config = K8sConfig(
        api_server_url=url.rstrip("/") if url else None,
        cluster_issuer=section.get("cluster_issuer", as_nonempty_str, defaults.cluster_issuer),
        token_file=section.get("token_file", as_nonempty_str, defaults.token_file),
        ca_file=section.get("ca_file", as_nonempty_str, defaults.ca_file),
    )
    path, context = kubeconfig.read_keys(section, dev)
    section.finish()
    return attrs.evolve(config, kubeconfig=path, context=context)


def _not_reserved(name: str) -> Optional[str]:
    return f"'{name}' is a reserved claim name" if name in RESERVED_CLAIMS else None


def _token(section: SectionReader) -> Optional[TokenConfig]:
    client_audience = section.get("client_audience", as_audiences)
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


def as_audiences(value: Any) -> tuple[str, ...]:
    """``client_audience``: a non-empty string or a non-empty list of them."""
    listed = [value] if isinstance(value, str) else value
    if (not isinstance(listed, (list, tuple)) or not listed
            or not all(isinstance(item, str) and item.strip() for item in listed)):
        raise ValueError("must be a non-empty string or a non-empty list of them")
    return tuple(dict.fromkeys(listed))


def _rate_limits(section: SectionReader) -> RateLimits:
    limits = RateLimits(
        per_client_per_sec=section.get("per_client_per_sec", as_number, None, positive),
        global_per_sec=section.get("global_per_sec", as_number, None, positive),
    )
    section.finish()
    return limits


def _limits(section: SectionReader) -> LimitsConfig:
    limits = LimitsConfig(max_connections=section.get("max_connections", as_int, 1024, positive))
    section.finish()
    return limits


def as_workers(value: Any) -> int:
    """``workers``: a count of at least 1, or ``"auto"`` for one per CPU core."""
    if value == "auto":
        return os.cpu_count() or 1
    count = as_int(value)
    if count < 1:
        raise ValueError('must be at least 1 or "auto"')
    return count


def _management(section: SectionReader) -> ManagementConfig:
    config = ManagementConfig(client_audience=section.get("client_audience", as_audiences, None))
    section.finish()
    return config


def _api_keys(section: SectionReader) -> ApiKeysConfig:
    prefix = section.get("prefix", as_nonempty_str, "jwtk", no_dots)
    profiles_section = section.table("profiles")
    profiles = {}
    for name in list(profiles_section.raw):
        profile = profiles_section.table(str(name))
        audience = profile.get("audience", as_nonempty_str)
        ttl = profile.get("ttl_secs", as_int, 3600, in_range(1, 86400))
        # Any string: M-Lab's relying parties expect ``iss: token-exchange``, not a URL.
        issuer = profile.get("issuer", as_nonempty_str, None)
        static = profile.get("claims", as_table, {}, _profile_claims)
        profile.finish()
        if audience is not None:
            profiles[str(name)] = ApiKeyProfile(str(name), audience, ttl, issuer, static)
    profiles_section.finish()
    section.finish()
    return ApiKeysConfig(prefix=prefix, profiles=profiles)


def _profile_claims(claims: Mapping[str, Any]) -> Optional[str]:
    """A profile's static claims never name a registered claim or what the token says of its key."""
    taken = sorted(set(claims) & (RESERVED_CLAIMS | API_KEY_CLAIMS))
    return f"{', '.join(taken)}: reserved claim names" if taken else None


def _metrics(section: SectionReader) -> MetricsConfig:
    config = MetricsConfig(enabled=section.get("enabled", as_bool, True))
    section.finish()
    return config


_LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical")


def _logging(section: SectionReader) -> LoggingConfig:
    config = LoggingConfig(
        format=section.get("format", as_str, "json", one_of("json", "text")),
        level=section.get(
            "level",
            as_str,
            None,
            lambda v: None if v.lower() in _LOG_LEVELS else "must be debug, info, warn, error or critical",
        ),
    )
    section.finish()
    return config


def _collector_url(value: str) -> Optional[str]:
    # Spans carry no secret (observability.md), so a collector in the cluster may be plain http.
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "must be an absolute http(s) URL"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an absolute http(s) URL"
    return None


def _tracing(section: SectionReader) -> TracingConfig:
    config = TracingConfig(
        enabled=section.get("enabled", as_bool, False),
        endpoint=section.get("endpoint", as_nonempty_str, None, _collector_url),
        service_name=section.get("service_name", as_nonempty_str, "jwtlet"),
        sample_ratio=section.get("sample_ratio", as_number, 1.0, in_range(0, 1)),
    )
    section.finish()
    return config
