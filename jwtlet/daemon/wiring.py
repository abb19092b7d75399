"""
Wiring: from a checked config to one service tree with the providers, the two
sites and an orderly shutdown.  ``jwtlet.daemon.tap`` and the ``jwtlet``
command call in here; nothing else builds providers.

Checking comes first and finds everything in one run (issue 14 #3): the core
schema, the listening endpoints, and each plugin's own options, the plugins
built in check mode even when the core found problems, so the daemon and
``jwtlet check-config`` list the same problems, all at once.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import attrs
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from jwtlet import tracing
from jwtlet.config import (
    DEFAULT_DATA_DIR,
    Config,
    ConfigError,
    ExtAuthzConfig,
    is_loopback_host,
    load_raw,
    read,
)
from jwtlet.daemon.dev import DevSeed, defaults, ensure, instructions
from jwtlet.daemon.plugins import Providers, as_service, attempt_providers, build_providers, is_found, known_plugins
from jwtlet.daemon.services import DrainService, HTTPClientService, SequentialMultiService
from jwtlet.daemon.workers import Listen
from jwtlet.daemon.workers import problems as worker_problems
from jwtlet.discovery import Discovered, discover
from jwtlet.exchange.apikeys import UnboundIntegrations
from jwtlet.exchange.pipeline import Exchange, build_exchange
from jwtlet.extauthz import trust
from jwtlet.extauthz.build import build_ext_authz, build_ext_authz_validator
from jwtlet.interfaces import ITrustedIssuers, PluginConfigError, PluginContext
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.outbound import build_http_client
from jwtlet.policy import reserved_claims
from jwtlet.providers import Validator
from jwtlet.tracing.service import TracingService
from jwtlet.tracing.web import traced
from jwtlet.web.callers import RejectionCache
from jwtlet.web.health import Readiness
from jwtlet.web.introspect import Introspection
from jwtlet.web.management_api import MAX_BODY, ManagementAPI
from jwtlet.web.server import BodyLimits, DrainingSite
from jwtlet.web.token_api import BODY_LIMITS, TokenExchangeAPI

log = Logger(namespace="jwtlet.daemon")


# -- loading and checking ---------------------------------------------------------


@attrs.frozen
class Loaded:
    """A configuration as read, the plugins found, and what the schema said about it."""

    config: Config
    discovered: Discovered
    problems: list[str]


def load(
    path: Optional[str],
    environ: Mapping[str, str],
    dev: bool = False,
    data_dir: Optional[str] = None,
) -> Loaded:
    """
    Load the config (over ``--dev``'s defaults with ``dev``), discover plugins
    (``plugin_dirs`` come from the config itself) and check it against the
    schema and the plugin names found.  Raises :class:`ConfigError` only for
    a file that cannot be read at all.
    """
    directory = Path(data_dir or DEFAULT_DATA_DIR)
    raw = load_raw(path, environ, defaults(directory) if dev else None)
    plugin_dirs = raw.get("plugin_dirs")
    if isinstance(plugin_dirs, list) and all(isinstance(d, str) for d in plugin_dirs):
        discovered = discover(plugin_dirs)
    else:
        discovered = discover()
    config, problems = read(raw, dev=dev, data_dir=directory, known_plugins=known_plugins(discovered))
    return Loaded(config, discovered, problems)


def load_checked(
    path: Optional[str],
    environ: Mapping[str, str],
    dev: bool = False,
    data_dir: Optional[str] = None,
) -> tuple[Config, Discovered]:
    """:func:`load`, raising :class:`ConfigError` if the schema found problems (plugins not checked yet)."""
    loaded = load(path, environ, dev, data_dir)
    if loaded.problems:
        raise ConfigError(loaded.problems)
    return loaded.config, loaded.discovered


def check(
    path: Optional[str],
    environ: Mapping[str, str],
    dev: bool = False,
    data_dir: Optional[str] = None,
) -> tuple[Config, Discovered]:
    """
    :func:`load` and every check the daemon runs before it starts (the
    endpoints, each plugin's own options), all in one run: raises
    :class:`ConfigError` listing every problem.  ``twistd jwtlet`` and
    ``jwtlet check-config`` both call this, so the two always agree.
    """
    loaded = load(path, environ, dev, data_dir)
    problems = loaded.problems + find_problems(loaded.config, loaded.discovered)
    if problems:
        raise ConfigError(problems)
    return loaded.config, loaded.discovered


_LOOPBACK_INTERFACE = re.compile(r"interface=(127\.[0-9.]+|localhost|\\:\\:1|::1)(:|$)")


def check_endpoints(config: Config, reactor: IReactorTime) -> list[str]:
    """The listening endpoints: parseable, and loopback only in ``--dev``."""
    problems = []
    for key, description, written in (
        ("token_exchange_endpoint", config.token_exchange_description(), config.token_exchange_endpoint),
        ("management_endpoint", config.management_description(), config.management_endpoint),
    ):
        try:
            serverFromString(reactor, description)
        except Exception as error:
            problems.append(f"{key}: not a Twisted endpoint description ({error})")
            continue
        # An endpoint made of ``bind`` is checked as ``bind`` by the schema: one problem, said once.
        if (config.dev and written is not None and not description.startswith("unix:")
                and not _LOOPBACK_INTERFACE.search(description)):
            problems.append(f"{key}: --dev listens on loopback only")
    grpc_endpoint = config.ext_authz.grpc_endpoint if config.ext_authz is not None else None
    if grpc_endpoint is not None:
        from jwtlet.extauthz.grpc_server import grpc_address  # grpcio is loaded only when the gRPC front is on

        try:
            host = grpc_address(grpc_endpoint).rpartition(":")[0]
        except PluginConfigError as error:
            problems.extend(error.messages)
        else:
            if config.dev and not is_loopback_host(host):
                problems.append("ext_authz.grpc_endpoint: --dev listens on loopback only")
    return problems


def find_problems(config: Config, discovered: Discovered) -> list[str]:
    """
    Every problem found without creating anything beyond the schema's: the
    endpoints, and each provider's own options, its providers built with
    ``check_only`` (no key files, no databases).  ``config`` may be one the
    schema found problems in: its plugins are checked all the same.  The
    providers get a reactor that never runs: whatever they schedule on it
    is dropped with them.
    """
    reactor = MemoryReactorClock()
    problems = check_endpoints(config, reactor) + worker_problems(config)
    context = PluginContext(
        reactor=reactor,
        clock=reactor,
        http_client=build_http_client(reactor),
        config=config,
        data_dir=config.data_dir,
        random_bytes=os.urandom,
        check_only=True,
    )
    attempt = attempt_providers(config, discovered, context)
    problems.extend(attempt.problems)
    problems.extend(tracing.check(config.tracing))
    if config.ext_authz is not None and is_found(discovered, "validator", config.ext_authz.validator):
        try:
            front = build_ext_authz_validator(config.ext_authz, discovered, attrs.evolve(context, store=attempt.store))
        except PluginConfigError as error:
            problems.extend(error.messages)
        else:
            problems.extend(trust_problems(config.ext_authz, attempt.validator, front))
    return problems


def trust_problems(settings: ExtAuthzConfig, top: Optional[Validator], front: Validator) -> list[str]:
    """
    security.md's rules on the ext_authz validator, over what the built
    validators say they trust (a validator that does not say is not held to
    them).  The top-level validator matters only with ``exchange: jwt``,
    where the front's identities meet the top-level mappings.
    """
    front_trust = ITrustedIssuers(front.provider, None)
    problems = trust.front_problems(settings, front_trust)
    top_trust = ITrustedIssuers(top.provider, None) if top is not None else None
    if settings.exchange == "jwt" and top_trust is not None and front_trust is not None:
        problems.extend(trust.prefixes_across_validators(top_trust.trusted_issuers(), front_trust.trusted_issuers()))
    return problems


# -- the apps and the service tree ---------------------------------------------------


@attrs.define
class APIs:
    """The two Klein apps and the exchange behind the token port."""

    exchange: Exchange
    token_api: TokenExchangeAPI
    management_api: ManagementAPI


def build_apis(
    config: Config,
    providers: Providers,
    clock: IReactorTime,
    metrics: Metrics,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> APIs:
    """Both Klein apps over already built providers (the tests build them this way too)."""
    readiness = Readiness(
        {"store": providers.store, "signer": providers.signer, "validator": providers.validator}, clock
    )
    exchange = build_exchange(config, providers.store, providers.signer, providers.validator, clock, metrics)
    # One cache of rejected callers for both ports that take management callers (security.md: one
    # validator call per distinct token per minute).
    callers = RejectionCache(providers.validator, clock)
    token_api = TokenExchangeAPI(
        exchange=exchange,
        signer=providers.signer,
        issuer_url=config.issuer,
        require_subject_token_type=config.token.require_subject_token_type,
        readiness=readiness,
        introspection=Introspection(
            validator=providers.validator,
            subject_audiences=config.token.client_audience,
            caller_audiences=config.management_client_audience,
            roles=config.service_accounts,
            limiter=exchange.limiter,
            clock=clock,
            callers=callers,
        ),
    )
    management_api = ManagementAPI(
        store=providers.store,
        validator=providers.validator,
        audiences=config.management_client_audience,
        roles=config.service_accounts,
        reserved_claims=reserved_claims(config.token.participant_context_claim),
        api_key_prefix=config.api_keys.prefix if config.api_keys else "jwtk",
        api_key_profiles=tuple(config.api_keys.profiles) if config.api_keys else (),
        metrics=metrics,
        metrics_enabled=config.metrics.enabled,
        readiness=readiness,
        random_bytes=random_bytes,
        clock=clock,
        callers=callers,
    )
    return APIs(exchange=exchange, token_api=token_api, management_api=management_api)


# ``reactor``: the daemon's reactor is timers, threads, sockets and more at
# once; zope interfaces cannot be intersected for mypy, and workers.py's
# ``WorkerReactor`` says only the socket part.  Any until one type says all.
def make_service(  # type: ignore[explicit-any]
    config: Config, discovered: Discovered, reactor: Any, listen: Optional[Listen] = None
) -> MultiService:
    """
    The whole daemon as one service; raises :class:`ConfigError`.  ``listen``
    makes the service that serves a site on an endpoint description (a
    worker's listens on the sockets its supervisor bound, ``workers.py``).
    """
    problems = find_problems(config, discovered)
    if problems:
        raise ConfigError(problems)
    if config.dev:
        ensure(config.data_dir)  # the dev issuer's key and the JWKS file its validator trusts
    http_client = build_http_client(reactor, ca_file=config.k8s.ca_file)
    metrics = Metrics()
    tracer = tracing.build(config.tracing, metrics)
    context = PluginContext(
        reactor=reactor,
        clock=reactor,
        http_client=http_client,
        config=config,
        data_dir=config.data_dir,
        random_bytes=os.urandom,
        metrics=metrics,
    )
    providers = build_providers(config, discovered, context)

    apis = build_apis(config, providers, reactor, metrics)
    token_api, management_api = apis.token_api, apis.management_api
    ext_authz = None
    if config.ext_authz is not None:
        try:
            ext_authz = build_ext_authz(
                config, discovered, attrs.evolve(context, store=providers.store), apis.exchange, metrics)
        except PluginConfigError as error:
            raise ConfigError(list(error.messages)) from None
        token_api.ext_authz = ext_authz.http_resource
    connections = config.limits.max_connections
    sites = [
        DrainingSite(traced(token_api.app.resource(), tracer), body_limits=BODY_LIMITS,
                     max_connections=connections, reactor=reactor),
        DrainingSite(traced(management_api.app.resource(), tracer), body_limits=BodyLimits(MAX_BODY),
                     max_connections=connections, reactor=reactor),
    ]

    daemon = SequentialMultiService()
    # First in, last out: spans of the last requests are flushed after the sites drained.
    TracingService(tracer, reactor).setServiceParent(daemon)
    HTTPClientService(http_client).setServiceParent(daemon)
    for provider in providers.services():
        if provider.parent is None:
            provider.setServiceParent(daemon)
    if config.dev:
        DevSeed(providers.store, config.data_dir).setServiceParent(daemon)
    if config.api_keys is not None:
        UnboundIntegrations(providers.store, config.api_keys.profiles).setServiceParent(daemon)
    if ext_authz is not None:
        validator_service = as_service(ext_authz.decider.validator)
        if validator_service is not None:
            validator_service.setServiceParent(daemon)
        if ext_authz.grpc_service is not None:
            ext_authz.grpc_service.setServiceParent(daemon)
    DrainService(sites, reactor).setServiceParent(daemon)
    for description, site in zip(
        (config.token_exchange_description(), config.management_description()), sites, strict=True
    ):
        if listen is None:
            strports.service(description, site, reactor=reactor).setServiceParent(daemon)
        else:
            listen(description, site).setServiceParent(daemon)
    if config.dev:
        text = instructions(config)
        sys.stderr.write(text)
        sys.stderr.flush()
        emit(log, "dev.instructions", instructions=text)
    return daemon
