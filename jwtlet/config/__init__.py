"""
The configuration room: where the raw configuration comes from
(:mod:`~jwtlet.config.sources`), the section reader the core and plugins
check options with (:mod:`~jwtlet.config.reader`), the shape of config.md
(:mod:`~jwtlet.config.schema`) and the check itself
(:mod:`~jwtlet.config.parse`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from jwtlet.config.errors import ConfigError
from jwtlet.config.parse import parse, read
from jwtlet.config.reader import SectionReader, https_url, is_loopback_host
from jwtlet.config.schema import (
    DEFAULT_DATA_DIR,
    ApiKeyProfile,
    ApiKeysConfig,
    Config,
    ExtAuthzConfig,
    K8sConfig,
    KnownPlugins,
    LimitsConfig,
    PluginSection,
    TargetCluster,
    TokenConfig,
)
from jwtlet.config.sources import CONFIG_FILE_ENV, env_overrides, load_raw, merge

__all__ = [
    "CONFIG_FILE_ENV",
    "DEFAULT_DATA_DIR",
    "ApiKeyProfile",
    "ApiKeysConfig",
    "Config",
    "ConfigError",
    "ExtAuthzConfig",
    "K8sConfig",
    "KnownPlugins",
    "LimitsConfig",
    "PluginSection",
    "SectionReader",
    "TargetCluster",
    "TokenConfig",
    "env_overrides",
    "https_url",
    "is_loopback_host",
    "load",
    "load_raw",
    "merge",
    "parse",
    "read",
]


def load(
    path: Optional[str] = None,
    environ: Optional[Mapping[str, str]] = None,
    *,
    base: Optional[Mapping[str, object]] = None,
    dev: bool = False,
    data_dir: Optional[str] = None,
    known_plugins: Optional[KnownPlugins] = None,
) -> Config:
    """
    Load (``base``, the file, the environment) and check the configuration;
    raises :class:`ConfigError`.  ``dev`` relaxes the https rule as ``--dev``
    does; the daemon supplies ``--dev``'s defaults as ``base``.
    """
    environ = os.environ if environ is None else environ
    raw = load_raw(path, environ, base)
    return parse(raw, dev=dev, data_dir=Path(data_dir or DEFAULT_DATA_DIR), known_plugins=known_plugins)
