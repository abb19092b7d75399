"""
The plugin author's guide's worked example really works: loaded from a
``plugin_dirs`` directory, listed by ``jwtlet plugins``, built from config,
and conforming to the signer suite.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
import yaml

from jwtlet.cli.main import command_plugins, parser
from jwtlet.daemon.plugins import build_provider
from jwtlet.daemon.wiring import load_checked
from jwtlet.interfaces import PluginConfigError, PluginContext
from jwtlet.testing.conformance.signer import assert_signer_conforms

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "plugins" / "seeded_ed25519_signer.py"


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A ``plugin_dirs`` directory holding the example (discovery leaves no trace of it behind)."""
    directory = tmp_path / "my-plugins"
    directory.mkdir()
    shutil.copy(EXAMPLE, directory / EXAMPLE.name)
    return directory


def write_config(tmp_path: Path, plugin_dir: Path, seed: bytes) -> Path:
    (tmp_path / "seed").write_bytes(seed)
    config = tmp_path / "jwtlet.yaml"
    config.write_text(yaml.safe_dump({
        "issuer": "https://jwtlet.example.com",
        "plugin_dirs": [str(plugin_dir)],
        "storage_backend": {"type": "memory"},
        "validator": {"type": "kubernetes-oidc", "issuers": [{"issuer": "https://k8s.example"}]},
        "token": {"client_audience": "a", "audience": "b"},
        "signer": {"type": "seeded-ed25519", "seed_file": str(tmp_path / "seed")},
    }))
    return config


@pytest_twisted.ensureDeferred
async def test_the_example_signer_loads_from_plugin_dirs_and_conforms(tmp_path: Path, plugin_dir: Path) -> None:
    config, discovered = load_checked(str(write_config(tmp_path, plugin_dir, os.urandom(32))), {})
    context = PluginContext(reactor=None, clock=None, http_client=None, config=config, data_dir=tmp_path)
    signer = build_provider(config, discovered, "signer", config.signer, context)
    await assert_signer_conforms(signer)


def test_jwtlet_plugins_lists_it(tmp_path: Path, plugin_dir: Path) -> None:
    config = write_config(tmp_path, plugin_dir, os.urandom(32))
    out = io.StringIO()
    assert command_plugins(parser().parse_args(["plugins", "--config", str(config)]), out) == 0
    lines = [line.split("\t") for line in out.getvalue().splitlines()]
    assert ["signer", "seeded-ed25519", "jwtlet.plugins.seeded_ed25519_signer",
            "signs with an Ed25519 key derived from a 32-byte seed file"] in lines
    assert ["store", "sqlite"] in [line[:2] for line in lines]


def test_its_option_errors_carry_the_section(tmp_path: Path, plugin_dir: Path) -> None:
    config, discovered = load_checked(str(write_config(tmp_path, plugin_dir, b"short")), {})
    context = PluginContext(reactor=None, clock=None, http_client=None, config=config, data_dir=tmp_path)
    with pytest.raises(PluginConfigError) as raised:
        build_provider(config, discovered, "signer", config.signer, context)
    assert raised.value.messages == ("signer.seed_file: must hold exactly 32 bytes, not 5",)
