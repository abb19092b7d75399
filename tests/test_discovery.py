"""Finding plugins in ``plugin_dirs`` without changing what the rest of the process sees."""

from __future__ import annotations

from pathlib import Path

import jwtlet.plugins
from jwtlet.discovery import discover

PLUGIN = '''
from twisted.plugin import IPlugin
from zope.interface import implementer

from jwtlet.interfaces import IValidatorFactory


@implementer(IPlugin, IValidatorFactory)
class Factory:
    name = "{name}"
    description = "a validator only {name}'s config knows"

    def build(self, options, context):
        raise NotImplementedError


factory = Factory()
'''


def plugin_dir(tmp_path: Path, directory: str, validator_name: str) -> Path:
    """A plugin directory whose module has the same file name in every directory."""
    path = tmp_path / directory
    path.mkdir()
    (path / "shared_name.py").write_text(PLUGIN.format(name=validator_name))
    return path


def validators(directories: list[Path]) -> set[str]:
    return set(discover([str(d) for d in directories]).known().names["validator"])


def test_two_configs_in_one_process_never_see_each_others_plugins(tmp_path: Path) -> None:
    """Config A's plugin directory must not leak into config B's discovery, even with the same module name."""
    first = plugin_dir(tmp_path, "a", "only-a")
    second = plugin_dir(tmp_path, "b", "only-b")
    path_before = list(jwtlet.plugins.__path__)
    assert "only-a" in validators([first])
    found = validators([second])
    assert "only-b" in found and "only-a" not in found
    assert not {"only-a", "only-b"} & validators([]), "no directory: only what is installed"
    assert list(jwtlet.plugins.__path__) == path_before, "the package path is what it was"


def test_a_module_that_fails_to_import_is_still_reported(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "needs_nothing_here.py").write_text("import no_such_module_anywhere\n")
    failures = discover([str(broken)]).failures
    assert "No module named 'no_such_module_anywhere'" in failures["jwtlet.plugins.needs_nothing_here"]
    assert "jwtlet.plugins.needs_nothing_here" not in discover().failures


def test_built_providers_come_adapted(tmp_path: Path) -> None:
    """The core awaits typed methods: discovery.build hands out the adapter, never the raw provider."""
    from jwtlet import config as configuration
    from jwtlet.discovery import build
    from jwtlet.interfaces import PluginContext
    from jwtlet.providers import Store

    config = configuration.parse({"issuer": "https://jwtlet.test", "token": {"client_audience": "a", "audience": "b"},
                           "storage_backend": {"type": "memory"}, "signer": {"type": "local-key"}},
                          data_dir=tmp_path)
    context = PluginContext(reactor=None, clock=None, http_client=None, config=config,  # type: ignore[arg-type]
                            data_dir=tmp_path)
    store = build(discover(), "store", config.storage_backend, context)
    assert isinstance(store, Store)
    assert type(store.provider).__name__ == "MemoryStore"


def test_discovering_the_built_in_plugins_does_not_load_the_postgres_driver(tmp_path: Path) -> None:
    """A daemon on SQLite never needs psycopg (~9 MB of memory): discovery imports every plugin module."""
    import subprocess
    import sys

    probe = ("import sys; from jwtlet.discovery import discover; discover(); "
             "print([m for m in ('psycopg', 'psycopg_pool') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "[]"
