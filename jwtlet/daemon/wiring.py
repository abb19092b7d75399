"""
Wiring: from a checked config to one service tree with the providers, the two
sites and an orderly shutdown.  ``jwtlet.tap`` and the ``jwtlet`` command call
in here; nothing else builds providers.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from jwtlet._async import as_deferred
from jwtlet.config import schema as configuration
from jwtlet.config.schema import Config, ConfigError, is_loopback_host
from jwtlet.daemon import dev as devissuer
from jwtlet.discovery import Discovered, build, discover
from jwtlet.exchange.apikeys import ApiKeyExchange, ApiKeyVerifier
from jwtlet.exchange.pipeline import Signing, TokenIssuer
from jwtlet.extauthz.decide import build_ext_authz, build_ext_authz_validator
from jwtlet.interfaces import Conflict, PluginConfigError, PluginContext
from jwtlet.logs import emit
from jwtlet.metrics import Metrics
from jwtlet.model import ResourceMapping, ScopeMapping
from jwtlet.outbound import build_http_client, close_http_client
from jwtlet.policy import IssueParameters, reserved_claims
from jwtlet.ratelimit import RateLimiter
from jwtlet.web import management_api as management
from jwtlet.web import token_api as exchange
from jwtlet.web.common import BodyLimits, DrainingSite, Readiness
from jwtlet.web.management_api import ManagementAPI
from jwtlet.web.token_api import TokenExchangeAPI

log = Logger(namespace="jwtlet.daemon")

DRAIN_TIMEOUT_SECS = 10.0


def load_checked(
    path: Optional[str],
    environ: Mapping[str, str],
    dev: bool = False,
    data_dir: Optional[str] = None,
) -> tuple[Config, Discovered]:
    """
    Load the config, discover plugins (``plugin_dirs`` come from the config
    itself) and check every ``type`` against what was found.
    """
    directory = Path(data_dir or configuration.DEFAULT_DATA_DIR)
    raw = configuration.load_raw(path, environ, dev, directory)
    plugin_dirs = raw.get("plugin_dirs")
    if isinstance(plugin_dirs, list) and all(isinstance(d, str) for d in plugin_dirs):
        discovered = discover(plugin_dirs)
    else:
        discovered = discover()
    checked = configuration.parse(raw, dev=dev, data_dir=directory, known_plugins=discovered.known())
    return checked, discovered


_LOOPBACK_INTERFACE = re.compile(r"interface=(127\.[0-9.]+|localhost|\\:\\:1|::1)(:|$)")


def check_endpoints(config: Config, reactor: Any) -> list[str]:
    """The listening endpoints: parseable, and loopback only in ``--dev``."""
    problems = []
    for key, description in (
        ("token_exchange_endpoint", config.token_exchange_description()),
        ("management_endpoint", config.management_description()),
    ):
        try:
            serverFromString(reactor, description)
        except Exception as error:
            problems.append(f"{key}: not a Twisted endpoint description ({error})")
            continue
        if config.dev and not description.startswith("unix:") and not _LOOPBACK_INTERFACE.search(description):
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
    Every problem the daemon reports at start, found without creating
    anything: the endpoints, and each provider's own options, its providers
    built with ``check_only`` (no key files, no databases).  ``make_service``
    and ``jwtlet check-config`` both call this, so the two always agree.
    The providers get a reactor that never runs: whatever they schedule on
    it is dropped with them.
    """
    reactor = MemoryReactorClock()
    problems = check_endpoints(config, reactor)
    context = PluginContext(
        reactor=reactor,
        clock=reactor,
        http_client=build_http_client(reactor),
        config=config,
        data_dir=config.data_dir,
        random_bytes=os.urandom,
        check_only=True,
    )
    providers, provider_problems = _attempt_providers(config, discovered, context)
    problems.extend(provider_problems)
    if config.ext_authz is not None:
        try:
            build_ext_authz_validator(config.ext_authz, discovered, attrs.evolve(context, store=providers.store))
        except PluginConfigError as error:
            problems.extend(error.messages)
    return problems


class SequentialMultiService(MultiService):
    """
    A ``MultiService`` that stops its children one at a time, last added
    first, each only after the previous one finished: listeners stop, then
    in-flight requests drain, then pools close.
    """

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        Service.stopService(self)
        for child in reversed(list(self)):
            try:
                await as_deferred(child.stopService())
            except Exception:
                log.failure("stopping {service} failed", service=child.name or repr(child))


@attrs.define
class DrainService(Service):
    """On stop, waits (bounded) for the requests the sites still serve."""

    sites: list[DrainingSite]
    reactor: Any
    timeout: float = DRAIN_TIMEOUT_SECS

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        for site in self.sites:
            waiting = site.drain()
            waiting.addTimeout(self.timeout, self.reactor)
            try:
                await waiting
            except TimeoutError:
                log.warn("{count} requests still in flight after {timeout}s", count=site.in_flight,
                         timeout=self.timeout)


@attrs.define
class HTTPClientService(Service):
    client: Any

    def stopService(self) -> Any:
        Service.stopService(self)
        return close_http_client(self.client)


DEV_SCOPE = ScopeMapping(scope="read", claims={"role": "reader"})
DEV_MAPPING = ResourceMapping(
    client_identifier="system:serviceaccount:default:demo", participant_context="demo", scopes=("read",)
)


#: Written in the data directory once ``--dev`` has seeded its store.
DEV_SEEDED_MARKER = ".dev-seeded"


@attrs.define
class DevSeed(Service):
    """
    Seeds the example scope and mapping of ``--dev`` once per data
    directory: a marker written after a successful seed means an operator
    who deleted the examples does not get them back at the next start.
    """

    store: Any
    data_dir: Path

    def startService(self) -> None:
        Service.startService(self)
        ensureDeferred(self.seed()).addErrback(lambda f: log.failure("seeding the dev store failed", f))

    async def seed(self) -> None:
        marker = self.data_dir / DEV_SEEDED_MARKER
        if marker.exists():
            return
        for create in (lambda: self.store.add_scope(DEV_SCOPE), lambda: self.store.add_mapping(DEV_MAPPING)):
            try:
                await as_deferred(create())
            except Conflict:
                pass  # a worker beside us seeded first, or a start that failed before the marker
        marker.touch(mode=0o600)


def dev_instructions(config: Config, data_dir: Path) -> str:
    token_url = f"http://127.0.0.1:{config.token_exchange_port}"
    management_url = f"http://127.0.0.1:{config.management_port}"
    directory = str(data_dir)
    return "\n".join(
        [
            f"jwtlet --dev: token exchange on {token_url}, management on {management_url}",
            "Exchange a development service account token for a jwtlet token:",
            f"  TOKEN=$(jwtlet dev-token default:demo --data-dir {directory})",
            f"  curl -s {token_url}/token"
            " -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange"
            " -d subject_token_type=urn:ietf:params:oauth:token-type:jwt"
            ' --data-urlencode "subject_token=$TOKEN" -d resource=demo -d scope=read',
            "Administer mappings:",
            f"  ADMIN=$(jwtlet dev-token jwtlet:admin --data-dir {directory})",
            f'  curl -s -H "Authorization: Bearer $ADMIN" {management_url}/api/v1/mappings',
            "",
        ]
    )


@attrs.define
class Providers:
    store: Any
    signer: Any
    validator: Any


def build_providers(config: Config, discovered: Discovered, context: PluginContext) -> Providers:
    """Build store, then signer and validator (which may use the store); all problems at once."""
    providers, problems = _attempt_providers(config, discovered, context)
    if problems:
        raise ConfigError(problems)
    return providers


def _attempt_providers(
    config: Config, discovered: Discovered, context: PluginContext
) -> tuple[Providers, list[str]]:
    """Each provider that could be built (``None`` for the others) and every problem found."""
    problems: list[str] = []

    def attempt(kind: str, section: configuration.PluginSection, ctx: PluginContext) -> Any:
        try:
            return build(discovered, kind, section, ctx)
        except PluginConfigError as error:
            problems.extend(as_written(config, message) for message in error.messages)
            return None

    store = attempt("store", config.storage_backend, context)
    with_store = attrs.evolve(context, store=store)
    signer = attempt("signer", signer_section(config), with_store)
    validator = attempt("validator", config.validator, with_store)
    return Providers(store=store, signer=signer, validator=validator), problems


def signer_section(config: Config) -> configuration.PluginSection:
    """vault-transit takes its options from the top-level ``vault`` table."""
    if config.signer.type == configuration.VAULT_TRANSIT:
        options = {**(config.vault or {}), **config.signer.options}
        return configuration.PluginSection(type=config.signer.type, options=options, section="vault")
    return config.signer


_OPTION = re.compile(r"vault\.(?P<key>[A-Za-z0-9_-]+)")


def as_written(config: Config, message: str) -> str:
    """
    A provider problem named after the section the operator wrote the option
    in: vault-transit reads ``vault`` and ``signer`` together (see
    :func:`signer_section`), so ``key_file`` left under ``signer`` is
    ``signer.key_file``, not ``vault.key_file``.  Other messages pass as
    they are.
    """
    match = _OPTION.match(message)
    if match is None or match.group("key") not in config.signer.options:
        return message
    return "signer." + message[len("vault."):]


@attrs.define
class APIs:
    """The two Klein apps and the issuer behind the token port."""

    issuer: TokenIssuer
    token_api: TokenExchangeAPI
    management_api: ManagementAPI


def build_apis(
    config: Config,
    providers: Providers,
    clock: Any,
    metrics: Metrics,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> APIs:
    """Both Klein apps over already built providers (the tests build them this way too)."""
    readiness = Readiness(
        {"store": providers.store, "signer": providers.signer, "validator": providers.validator}, clock
    )
    parameters = IssueParameters(
        issuer=config.issuer,
        participant_context_claim=config.token.participant_context_claim,
        ttl_secs=config.token.token_ttl_secs,
    )
    signing = Signing(providers.signer, clock, metrics)
    limiter = RateLimiter(clock, config.rate_limits.per_client_per_sec, config.rate_limits.global_per_sec)
    issuer = TokenIssuer(
        validator=providers.validator,
        store=providers.store,
        signing=signing,
        parameters=parameters,
        client_audience=config.token.client_audience,
        default_audience=config.token.audience,
        reject_replays=config.token.reject_replayed_subject_tokens,
        clock=clock,
        metrics=metrics,
        limiter=limiter,
    )
    api_keys = None
    if config.api_keys is not None:
        api_keys = ApiKeyExchange(
            verifier=ApiKeyVerifier(providers.store, config.api_keys.prefix),
            config=config.api_keys,
            issuer=config.issuer,
            signing=signing,
            clock=clock,
            metrics=metrics,
            limiter=limiter,
        )
    token_api = TokenExchangeAPI(
        issuer=issuer,
        signer=providers.signer,
        issuer_url=config.issuer,
        require_subject_token_type=config.token.require_subject_token_type,
        readiness=readiness,
        api_keys=api_keys,
    )
    management_api = ManagementAPI(
        store=providers.store,
        validator=providers.validator,
        audience=config.management_client_audience,
        roles=config.service_accounts,
        reserved_claims=reserved_claims(config.token.participant_context_claim),
        api_key_prefix=config.api_keys.prefix if config.api_keys else "jwtk",
        metrics=metrics,
        metrics_enabled=config.metrics.enabled,
        readiness=readiness,
        random_bytes=random_bytes,
        clock=clock,
    )
    return APIs(issuer=issuer, token_api=token_api, management_api=management_api)


def make_service(config: Config, discovered: Discovered, reactor: Any) -> MultiService:
    """The whole daemon as one service; raises :class:`ConfigError`."""
    problems = find_problems(config, discovered)
    if problems:
        raise ConfigError(problems)
    data_dir = config.data_dir
    if config.dev:
        data_dir.mkdir(parents=True, exist_ok=True)
        devissuer.ensure(data_dir)
    http_client = build_http_client(reactor, ca_file=config.k8s.ca_file)
    metrics = Metrics()
    context = PluginContext(
        reactor=reactor,
        clock=reactor,
        http_client=http_client,
        config=config,
        data_dir=data_dir,
        random_bytes=os.urandom,
    )
    providers = build_providers(config, discovered, context)
    hook = getattr(providers.validator, "on_jwks_refresh", None)
    if hook is not None:
        providers.validator.on_jwks_refresh = lambda outcome: metrics.jwks_refresh.labels(outcome).inc()

    apis = build_apis(config, providers, reactor, metrics)
    token_api, management_api = apis.token_api, apis.management_api
    ext_authz = None
    if config.ext_authz is not None:
        try:
            ext_authz = build_ext_authz(
                config, discovered, attrs.evolve(context, store=providers.store), apis.issuer, metrics)
        except PluginConfigError as error:
            raise ConfigError(list(error.messages)) from None
        token_api.ext_authz = ext_authz.http_resource
    connections = config.limits.max_connections
    sites = [
        DrainingSite(token_api.app.resource(), body_limits=exchange.BODY_LIMITS, max_connections=connections,
                     reactor=reactor),
        DrainingSite(management_api.app.resource(), body_limits=BodyLimits(management.MAX_BODY),
                     max_connections=connections, reactor=reactor),
    ]

    daemon = SequentialMultiService()
    HTTPClientService(http_client).setServiceParent(daemon)
    for provider in (providers.store, providers.signer, providers.validator):
        if IService.providedBy(provider) and provider.parent is None:
            provider.setServiceParent(daemon)
    if config.dev:
        DevSeed(providers.store, data_dir).setServiceParent(daemon)
    if ext_authz is not None:
        if IService.providedBy(ext_authz.decider.validator):
            ext_authz.decider.validator.setServiceParent(daemon)
        if ext_authz.grpc_service is not None:
            ext_authz.grpc_service.setServiceParent(daemon)
    DrainService(sites, reactor).setServiceParent(daemon)
    for description, site in zip(
        (config.token_exchange_description(), config.management_description()), sites, strict=True
    ):
        strports.service(description, site, reactor=reactor).setServiceParent(daemon)
    if config.dev:
        instructions = dev_instructions(config, data_dir)
        sys.stderr.write(instructions)
        sys.stderr.flush()
        emit(log, "dev.instructions", instructions=instructions)
    return daemon
