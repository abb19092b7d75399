"""
The daemon (``twistd -n jwtlet``) signing with the fake Vault over loopback:
tokens verify from the JWKS, a sealed Vault is 503 and the daemon recovers by
itself, rotation at Vault reaches the JWKS and signs publish_before_use_secs
later.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_twisted
from vault_fixtures import ROOT, RunningVault, daemon_config, running_vault, vault_signed_exchange_outage_and_rotation

pytestmark = pytest.mark.slow


@pytest_twisted.async_yield_fixture
async def vault() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


@pytest.mark.parametrize("key_type, rsa_algorithm", [("ed25519", "RS256"), ("rsa-2048", "PS256")])
@pytest_twisted.ensureDeferred
async def test_vault_signed_exchange_outage_and_rotation(
    tmp_path: Path, vault: RunningVault, key_type: str, rsa_algorithm: str
) -> None:
    config = daemon_config(tmp_path, vault.url, ROOT, key_type=key_type, rsa_algorithm=rsa_algorithm)
    await vault_signed_exchange_outage_and_rotation(tmp_path, config, vault)
