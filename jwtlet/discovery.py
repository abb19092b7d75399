"""
Finding plugin factories with ``twisted.plugin`` over ``jwtlet.plugins``
(which spans every installed distribution's ``jwtlet/plugins`` and the
config's ``plugin_dirs``) and building the providers the config names.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import attrs
from twisted.plugin import getPlugins
from twisted.python.modules import getModule
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import jwtlet.plugins
from jwtlet.config.schema import KnownPlugins, PluginSection
from jwtlet.interfaces import (
    IMappingStore,
    IMappingStoreFactory,
    ISigner,
    ISignerFactory,
    IValidator,
    IValidatorFactory,
    PluginConfigError,
    PluginContext,
)

KINDS: Mapping[str, tuple[type[Interface], type[Interface]]] = {
    "validator": (IValidatorFactory, IValidator),
    "store": (IMappingStoreFactory, IMappingStore),
    "signer": (ISignerFactory, ISigner),
}


@attrs.frozen
class Found:
    kind: str
    name: str
    module: str
    description: str
    factory: Any


@attrs.frozen
class Discovered:
    plugins: tuple[Found, ...]
    failures: Mapping[str, str]

    def factory(self, kind: str, name: str) -> Any:
        for found in self.plugins:
            if found.kind == kind and found.name == name:
                return found.factory
        raise LookupError(f"no {kind} plugin named {name!r}")

    def known(self) -> KnownPlugins:
        names: dict[str, set[str]] = {kind: set() for kind in KINDS}
        for found in self.plugins:
            names[found.kind].add(found.name)
        return KnownPlugins(
            names={kind: frozenset(values) for kind, values in names.items()},
            failures=self.failures,
        )


def add_plugin_dirs(directories: Iterable[str]) -> None:
    """Make ``plugin_dirs`` part of the ``jwtlet.plugins`` package path."""
    path: list[str] = jwtlet.plugins.__path__  # type: ignore[assignment]
    for directory in directories:
        absolute = str(Path(directory).resolve())
        if absolute not in path:
            path.append(absolute)


def _import_failures() -> dict[str, str]:
    """
    Import every plugin module once, recording why each failure happened:
    ``getPlugins`` only logs import errors, without the module's name.
    """
    failures = {}
    for module in getModule(jwtlet.plugins.__name__).iterModules():
        try:
            importlib.import_module(module.name)
        except Exception as error:
            line = traceback.format_exception_only(type(error), error)[-1].strip()
            failures[module.name] = line
    return failures


def discover(plugin_dirs: Sequence[str] = ()) -> Discovered:
    add_plugin_dirs(plugin_dirs)
    failures = _import_failures()
    plugins = []
    for kind, (factory_interface, _) in KINDS.items():
        factory: Any
        for factory in getPlugins(factory_interface, jwtlet.plugins):
            plugins.append(
                Found(
                    kind=kind,
                    name=str(factory.name),
                    module=type(factory).__module__,
                    description=str(getattr(factory, "description", "")),
                    factory=factory,
                )
            )
    plugins.sort(key=lambda found: (found.kind, found.name))
    return Discovered(plugins=tuple(plugins), failures=failures)


def build(
    discovered: Discovered, kind: str, section: PluginSection, context: PluginContext
) -> Any:
    """
    Build the provider ``section`` names; problems raise
    :class:`PluginConfigError` with messages prefixed by the section's path.
    """
    factory = discovered.factory(kind, section.type)
    try:
        provider = factory.build(dict(section.options), context)
    except PluginConfigError as error:
        raise PluginConfigError(*(f"{section.section}.{message}" for message in error.messages)) from None
    provided_interface = KINDS[kind][1]
    try:
        verifyObject(provided_interface, provider)
    except Invalid as error:
        raise PluginConfigError(
            f"{section.section}.type: plugin '{section.type}' built an object that does not "
            f"provide {provided_interface.__name__}: {error}"
        ) from None
    return provider
