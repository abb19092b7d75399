"""The twistd plugin's wiring, on a MemoryReactor: options, sites, plugin dirs, stop order."""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path
from typing import Any, Iterator

import attrs
import pytest
import pytest_twisted
from twisted.application.service import IService, IServiceMaker
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin

import jwtlet.daemon.tap
import jwtlet.plugins
from jwtlet import keys
from jwtlet.config import ConfigError
from jwtlet.daemon import dev, services, wiring
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.metrics import Metrics
from jwtlet.plugins.memory_store import MemoryStore

STATIC_VALIDATOR_PLUGIN = textwrap.dedent(
    '''
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from jwtlet.interfaces import IValidatorFactory, PluginConfigError
    from jwtlet.testing.fakes import StaticValidator


    @implementer(IPlugin, IValidatorFactory)
    class StaticValidatorFactory:
        name = "static-test"
        description = "accepts a fixed set of tokens (tests)"

        def __init__(self):
            self.contexts = []

        def build(self, options, context):
            self.contexts.append(context)
            if set(options) - {"strict"}:
                raise PluginConfigError(*(f"{k}: unknown key" for k in sorted(set(options) - {"strict"})))
            return StaticValidator()


    static_test = StaticValidatorFactory()
    '''
)


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "static_test_validator.py").write_text(STATIC_VALIDATOR_PLUGIN)
    (directory / "broken_plugin.py").write_text("import no_such_module_anywhere\n")
    yield directory
    # plugin_dirs extend the process-wide package path; later tests must not see these.
    path = jwtlet.plugins.__path__
    path[:] = [entry for entry in path if entry != str(directory.resolve())]


def write_config(tmp_path: Path, plugin_dir: Path, **extra: Any) -> Path:
    keys.write_new(tmp_path / "signing.jwk", keys.generate("ES256"))
    raw = {
        "issuer": "https://jwtlet.test",
        "bind": "127.0.0.1",
        "token_exchange_port": 18080,
        "management_port": 18081,
        "plugin_dirs": [str(plugin_dir)],
        "storage_backend": {"type": "memory"},
        "validator": {"type": "static-test"},
        "signer": {"type": "local-key", "key_file": str(tmp_path / "signing.jwk")},
        "token": {"client_audience": "ca", "audience": "svc"},
    }
    raw.update(extra)
    path = tmp_path / "jwtlet.yaml"
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_dropin_points_at_jwtlet_tap() -> None:
    from twisted.plugins.jwtlet_plugin import jwtlet as service_maker

    assert IPlugin.providedBy(service_maker)
    assert IServiceMaker.providedBy(service_maker)
    assert service_maker.tapname == "jwtlet"
    assert service_maker.options is jwtlet.daemon.tap.Options
    assert service_maker.makeService is jwtlet.daemon.tap.makeService


def test_make_service_opens_both_ports_and_starts_providers(tmp_path: Path, plugin_dir: Path) -> None:
    path = write_config(tmp_path, plugin_dir)
    config, discovered = wiring.load_checked(str(path), {})
    assert "jwtlet.plugins.broken_plugin" in discovered.failures
    assert "No module named 'no_such_module_anywhere'" in discovered.failures["jwtlet.plugins.broken_plugin"]
    reactor = MemoryReactorClock()
    service = wiring.make_service(config, discovered, reactor)
    assert IService.providedBy(service)
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (18080, "127.0.0.1"),
        (18081, "127.0.0.1"),
    ]
    stopped: list[Any] = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [None]


def test_providers_get_the_daemons_metrics_instead_of_hooks_patched_on(tmp_path: Path, plugin_dir: Path) -> None:
    """A provider counts what it does (JWKS refreshes) through context.metrics; the check-mode build has none."""
    config, discovered = wiring.load_checked(str(write_config(tmp_path, plugin_dir)), {})
    (factory,) = [found.factory for found in discovered.plugins if found.name == "static-test"]
    factory.contexts.clear()  # the plugin module may have been imported by an earlier test
    wiring.make_service(config, discovered, MemoryReactorClock())
    checking, serving = factory.contexts
    assert checking.check_only and checking.metrics is None
    assert not serving.check_only and isinstance(serving.metrics, Metrics)


def test_plugin_option_problems_are_reported_with_their_section(tmp_path: Path, plugin_dir: Path) -> None:
    path = write_config(tmp_path, plugin_dir, validator={"type": "static-test", "bogus": 1, "other": 2},
                        signer={"type": "local-key", "key_file": str(tmp_path / "missing.jwk")})
    config, discovered = wiring.load_checked(str(path), {})
    with pytest.raises(ConfigError) as raised:
        wiring.make_service(config, discovered, MemoryReactorClock())
    assert raised.value.problems[0].startswith("signer.key_file: ")
    assert raised.value.problems[1:] == ["validator.bogus: unknown key", "validator.other: unknown key"]


def test_bad_endpoint_descriptions_are_config_errors(tmp_path: Path, plugin_dir: Path) -> None:
    path = write_config(tmp_path, plugin_dir, management_endpoint="nonsense:1234")
    config, discovered = wiring.load_checked(str(path), {})
    with pytest.raises(ConfigError) as raised:
        wiring.make_service(config, discovered, MemoryReactorClock())
    assert raised.value.problems[0].startswith("management_endpoint: not a Twisted endpoint description")


def test_options_exit_1_with_every_problem_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("token_exchange_port: 0\nsigner: {type: nope}\nstorage_backend: {type: memory, colour: blue}\n")
    options = jwtlet.daemon.tap.Options()
    with pytest.raises(SystemExit) as raised:
        options.parseOptions(["--config", str(bad)])
    assert raised.value.code == 1
    err = capsys.readouterr().err
    assert "issuer: required" in err
    assert "token_exchange_port: must be between 1 and 65535" in err
    assert "signer.type: no signer plugin named 'nope'" in err
    assert "storage_backend.colour: unknown key" in err, "a plugin's problems come in the same run as the core's"


def test_sequential_stop_order() -> None:
    from twisted.application.service import Service
    from twisted.internet.defer import Deferred

    order: list[str] = []
    pending: Deferred[None] = Deferred()

    class Recorder(Service):
        def __init__(self, name: str, result: Any = None):
            self.name, self.result = name, result

        def stopService(self) -> Any:
            order.append(self.name)
            return self.result

    parent = services.SequentialMultiService()
    for child in (Recorder("pools"), Recorder("drain", pending), Recorder("listeners")):
        child.setServiceParent(parent)
    parent.startService()
    done: list[Any] = []
    parent.stopService().addBoth(done.append)
    assert order == ["listeners", "drain"], "pools wait for the drain"
    pending.callback(None)
    assert order == ["listeners", "drain", "pools"]
    assert done == [None]


def test_drain_waits_for_in_flight_requests_with_a_bound() -> None:
    from jwtlet.web.server import DrainingSite

    reactor = MemoryReactorClock()
    site = DrainingSite(None)
    site.in_flight = 1
    drain = services.DrainService([site], reactor, timeout=10)
    done: list[Any] = []
    drain.stopService().addBoth(done.append)
    reactor.advance(9)
    assert done == []
    reactor.advance(2)
    assert done == [None], "gives up after the timeout instead of hanging"


def test_both_sites_drain_under_one_bound_and_a_late_finish_after_it_is_harmless() -> None:
    """cli.md: the whole stop takes at most 10 s, not 10 s per port."""
    from jwtlet.web.server import DrainingSite

    reactor = MemoryReactorClock()
    sites = [DrainingSite(None), DrainingSite(None)]
    for site in sites:
        site.in_flight = 1
    done: list[Any] = []
    services.DrainService(sites, reactor, timeout=10).stopService().addBoth(done.append)
    reactor.advance(10)
    assert done == [None]
    for site in sites:
        site._finished(None)  # the request that outlived the drain ends now: nothing is left to wake
    assert sites[0].in_flight == 0


def test_dev_instructions_name_the_commands(tmp_path: Path) -> None:
    config, _ = wiring.load_checked(None, {}, dev=True, data_dir=str(tmp_path))
    text = dev.instructions(config)
    assert f"jwtlet dev-token default:demo --data-dir {tmp_path}" in text
    assert "curl -s http://127.0.0.1:8080/token" in text


@pytest_twisted.ensureDeferred
async def test_dev_seeds_once_per_data_directory(tmp_path: Path, clock: Clock) -> None:
    """An operator deletes --dev's example scope and mapping: the next start must not bring them back."""
    store = MemoryStore(clock)
    await dev.DevSeed(store, tmp_path).seed()
    assert (await store.list_scopes(), await store.list_mappings()) == ([dev.EXAMPLE_SCOPE], [dev.EXAMPLE_MAPPING])
    await store.delete_scope(dev.EXAMPLE_SCOPE.scope)
    await store.delete_mapping(*dev.EXAMPLE_MAPPING.key)
    restarted = dev.DevSeed(store, tmp_path)
    restarted.startService()
    await restarted.seed()
    assert (await store.list_scopes(), await store.list_mappings()) == ([], [])
    assert stat.S_IMODE((tmp_path / dev.SEEDED_MARKER).stat().st_mode) == 0o600


@attrs.define
class MappingsDown:
    """A store whose database goes away after the scope was written."""

    store: MemoryStore

    def add_scope(self, scope: Any) -> Any:
        return self.store.add_scope(scope)

    def add_mapping(self, mapping: Any) -> Any:
        return fail(DependencyUnavailable("database down"))


@pytest_twisted.ensureDeferred
async def test_a_failed_dev_seed_is_tried_again_at_the_next_start(tmp_path: Path, clock: Clock) -> None:
    store = MemoryStore(clock)
    with pytest.raises(DependencyUnavailable):
        await dev.DevSeed(MappingsDown(store), tmp_path).seed()
    assert not (tmp_path / dev.SEEDED_MARKER).exists()
    await dev.DevSeed(store, tmp_path).seed()
    assert await store.list_mappings() == [dev.EXAMPLE_MAPPING]
