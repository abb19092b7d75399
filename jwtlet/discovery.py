"""
Finding plugin factories with ``twisted.plugin`` over ``jwtlet.plugins``
(which spans every installed distribution's ``jwtlet/plugins`` and the
config's ``plugin_dirs``), building the providers the config names, and
adapting each once (:mod:`jwtlet.providers`) so the core awaits typed methods.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Mapping, Sequence, overload

import attrs
from twisted.plugin import getPlugins
from twisted.python.modules import getModule
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import jwtlet.plugins
from jwtlet.config import KnownPlugins, PluginSection
from jwtlet.interfaces import (
    IMappingStore,
    IMappingStoreFactory,
    IProviderFactory,
    ISigner,
    ISignerFactory,
    IValidator,
    IValidatorFactory,
    PluginConfigError,
    PluginContext,
)
from jwtlet.providers import Adapted, Signer, Store, Validator, adapt

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
    factory: IProviderFactory


@attrs.frozen
class Discovered:
    plugins: tuple[Found, ...]
    failures: Mapping[str, str]

    def factory(self, kind: str, name: str) -> IProviderFactory:
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


@contextmanager
def _searching(directories: Sequence[str]) -> Iterator[None]:
    """
    Make ``directories`` part of the ``jwtlet.plugins`` package path only
    while one discovery runs, so that two configs in one process never see
    each other's plugins.

    Why not a private package object: ``getPlugins`` finds the package's
    modules through ``getModule(package.__name__)``, that is through
    ``sys.modules``, and imports them by their dotted name, so the search
    must go through the real package.  Discovery runs synchronously in one
    thread, and afterwards the path is what it was and the modules imported
    from ``directories`` are forgotten (a factory already found keeps its
    module alive), so a later discovery imports a directory's module afresh
    and never another directory's module of the same name.
    """
    path: list[str] = jwtlet.plugins.__path__  # type: ignore[assignment]
    saved = list(path)
    added = [str(Path(directory).resolve()) for directory in directories]
    path.extend(directory for directory in added if directory not in saved)
    try:
        yield
    finally:
        path[:] = saved
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None) or ""
            if name.startswith(f"{jwtlet.plugins.__name__}.") and any(
                origin.startswith(directory + "/") for directory in added if directory not in saved
            ):
                del sys.modules[name]


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
    plugins = []
    with _searching(plugin_dirs):
        failures = _import_failures()
        for kind, (factory_interface, _) in KINDS.items():
            for factory in getPlugins(factory_interface, jwtlet.plugins):
                found: IProviderFactory = factory  # type: ignore[assignment]
                plugins.append(
                    Found(
                        kind=kind,
                        name=str(found.name),
                        module=type(found).__module__,
                        description=str(getattr(found, "description", "")),
                        factory=found,
                    )
                )
    plugins.sort(key=lambda found: (found.kind, found.name))
    return Discovered(plugins=tuple(plugins), failures=failures)


@overload
def build(
    discovered: Discovered, kind: Literal["validator"], section: PluginSection, context: PluginContext
) -> Validator: ...
@overload
def build(
    discovered: Discovered, kind: Literal["store"], section: PluginSection, context: PluginContext
) -> Store: ...
@overload
def build(
    discovered: Discovered, kind: Literal["signer"], section: PluginSection, context: PluginContext
) -> Signer: ...
@overload
def build(discovered: Discovered, kind: str, section: PluginSection, context: PluginContext) -> Adapted: ...


def build(discovered: Discovered, kind: str, section: PluginSection, context: PluginContext) -> Adapted:
    """
    Build the provider ``section`` names, adapted (:func:`jwtlet.providers.adapt`);
    problems raise :class:`PluginConfigError` with messages prefixed by the
    section's path.
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
    return adapt(kind, provider)
