"""
The daemon's side of plugins: which top-level table each plugin owns, and
building each provider the config names with its options, every problem
found at once (store first: signer and validator may use it).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import attrs
from twisted.application.service import IService

from jwtlet.config import Config, ConfigError, KnownPlugins, PluginSection
from jwtlet.discovery import Discovered, build
from jwtlet.interfaces import PluginConfigError, PluginContext
from jwtlet.providers import Adapted, Signer, Store, Validator


def known_plugins(discovered: Discovered) -> KnownPlugins:
    """
    What the config is checked against: the plugin names discovery found,
    and the top-level table each plugin owns (a factory's ``table``
    attribute), so such a table is accepted and names its owner the default.
    """
    tables = {}
    for found in discovered.plugins:
        table = getattr(found.factory, "table", None)
        if isinstance(table, str):
            tables[table] = (found.kind, found.name)
    return attrs.evolve(discovered.known(), tables=tables)


@attrs.define
class Providers:
    store: Store
    signer: Signer
    validator: Validator

    def services(self) -> list[IService]:
        """The providers that start and stop with the daemon."""
        found = (as_service(provider) for provider in (self.store, self.signer, self.validator))
        return [service for service in found if service is not None]


def as_service(provider: Adapted) -> Optional[IService]:
    """The provider behind its adapter, if it is a service (started and stopped with the daemon)."""
    return provider.provider if IService.providedBy(provider.provider) else None


def build_providers(config: Config, discovered: Discovered, context: PluginContext) -> Providers:
    """Build store, then signer and validator (which may use the store); all problems at once."""
    attempt = attempt_providers(config, discovered, context)
    if attempt.problems:
        raise ConfigError(attempt.problems)
    missing = [section for section, built in ((config.storage_backend, attempt.store), (config.signer, attempt.signer),
                                              (config.validator, attempt.validator)) if built is None]
    if missing:  # a config that skipped the schema's check of ``type`` names
        raise ConfigError([f"{section.section}.type: no plugin named '{section.type}'" for section in missing])
    assert attempt.store is not None and attempt.signer is not None and attempt.validator is not None
    return Providers(store=attempt.store, signer=attempt.signer, validator=attempt.validator)


def is_found(discovered: Discovered, kind: str, section: PluginSection) -> bool:
    """Whether ``section`` names a plugin that was found (the schema reports it otherwise)."""
    return any(found.kind == kind and found.name == section.type for found in discovered.plugins)


@attrs.frozen
class Attempt:
    """Each provider that could be built (``None`` for the others) and every problem found."""

    store: Optional[Store]
    signer: Optional[Signer]
    validator: Optional[Validator]
    problems: list[str]


def attempt_providers(config: Config, discovered: Discovered, context: PluginContext) -> Attempt:
    problems: list[str] = []

    def attempt(kind: str, section: PluginSection, ctx: PluginContext) -> Optional[Adapted]:
        if not is_found(discovered, kind, section):
            return None
        try:
            return build_provider(config, discovered, kind, section, ctx)
        except PluginConfigError as error:
            problems.extend(error.messages)
            return None

    store = attempt("store", config.storage_backend, context)
    assert store is None or isinstance(store, Store)
    with_store = attrs.evolve(context, store=store)
    signer = attempt("signer", config.signer, with_store)
    validator = attempt("validator", config.validator, with_store)
    assert signer is None or isinstance(signer, Signer)
    assert validator is None or isinstance(validator, Validator)
    return Attempt(store, signer, validator, problems)


def build_provider(
    config: Config, discovered: Discovered, kind: str, section: PluginSection, context: PluginContext
) -> Adapted:
    """
    The provider ``section`` names, built by its plugin; raises
    :class:`PluginConfigError` with every problem named by its key path.
    """
    options, rename = with_owned_table(config, discovered, kind, section)
    try:
        return build(discovered, kind, options, context)
    except PluginConfigError as error:
        raise PluginConfigError(*(rename(message) for message in error.messages)) from None


def with_owned_table(
    config: Config, discovered: Discovered, kind: str, section: PluginSection
) -> tuple[PluginSection, Callable[[str], str]]:
    """
    The options a plugin is built with, and how to name its problems.  A
    plugin that owns a top-level table (config.md: vault-transit's ``vault``)
    takes its options from that table with its own section's on top (the
    Rust jwtlet's layout, kept), and a problem is named after the section the
    operator wrote the option in: ``key_file`` left under ``signer`` is
    ``signer.key_file``, not ``vault.key_file``.  Any other plugin gets its
    section as it is.
    """
    owned = {name: table for table, (owner_kind, name) in known_plugins(discovered).tables.items()
             if owner_kind == kind}
    table = owned.get(section.type)
    if table is None:
        return section, lambda message: message
    merged = PluginSection(section.type, {**config.tables.get(table, {}), **section.options}, section=table)
    match = re.compile(rf"{re.escape(table)}\.(?P<key>[A-Za-z0-9_-]+)")

    def rename(message: str) -> str:
        written = match.match(message)
        if written is None or written.group("key") not in section.options:
            return message
        return f"{section.section}.{message[len(table) + 1:]}"

    return merged, rename
