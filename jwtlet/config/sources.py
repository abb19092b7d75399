"""
Where the raw configuration comes from (config.md, "Where it comes from"): a
YAML or TOML file, then ``JWTLET__A__B`` environment overrides, layered over
a base (the ``--dev`` defaults, which the daemon supplies).  Nothing here
checks what the values mean; :mod:`jwtlet.config.schema` does.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Mapping, Optional

import yaml

from jwtlet.config.errors import ConfigError

ENV_PREFIX = "JWTLET__"
CONFIG_FILE_ENV = "JWTLET_CONFIG_FILE"


def read_file(path: Path) -> Mapping[str, object]:
    """Parse a YAML or TOML config file by its extension."""
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(text.decode("utf-8"))
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


def env_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    """
    ``JWTLET__A__B=value`` as ``{"a": {"b": value}}``, values parsed as YAML
    scalars (so ``9090`` is an int and ``true`` a bool).
    """
    tree: dict[str, object] = {}
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
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def merge(base: Mapping[str, object], top: Mapping[str, object]) -> dict[str, object]:
    """Deep-merge ``top`` over ``base`` (tables merge, anything else replaces)."""
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = merge(below, value)
        else:
            merged[key] = value
    return merged


def load_raw(
    path: Optional[str],
    environ: Mapping[str, str],
    base: Optional[Mapping[str, object]] = None,
) -> dict[str, object]:
    """
    The raw mapping: ``base``, then the file (``path``, else
    ``$JWTLET_CONFIG_FILE``), then the environment, each over the one before.
    """
    raw: dict[str, object] = dict(base or {})
    path = path or environ.get(CONFIG_FILE_ENV) or None
    if path:
        raw = merge(raw, read_file(Path(path)))
    return merge(raw, env_overrides(environ))
