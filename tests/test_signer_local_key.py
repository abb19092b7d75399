"""The local-key signer: conformance for every algorithm, rotation, options."""

from __future__ import annotations

import stat
import types
from pathlib import Path

import pytest
import pytest_twisted

from jwtlet import keys
from jwtlet.interfaces import PluginConfigError
from jwtlet.plugins.local_key import local_key
from jwtlet.testing.conformance.signer import assert_signer_conforms


def context(tmp_path: Path, check_only: bool = False) -> types.SimpleNamespace:
    return types.SimpleNamespace(data_dir=tmp_path, check_only=check_only)


@pytest.mark.parametrize("algorithm", keys.ALGORITHMS)
@pytest_twisted.ensureDeferred
async def test_conforms_for_every_algorithm(tmp_path: Path, algorithm: str) -> None:
    path = tmp_path / "key.jwk"
    keys.write_new(path, keys.generate(algorithm))
    signer = local_key.build({"key_file": str(path)}, context(tmp_path))
    assert signer.algorithm == algorithm
    await assert_signer_conforms(signer)


@pytest_twisted.ensureDeferred
async def test_pem_key_conforms(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(keys.generate("ES256").export_to_pem(private_key=True, password=None))
    signer = local_key.build({"key_file": str(path)}, context(tmp_path))
    assert signer.algorithm == "ES256"
    await assert_signer_conforms(signer)


@pytest_twisted.ensureDeferred
async def test_rotation_first_key_signs_all_publish(tmp_path: Path) -> None:
    new, old = tmp_path / "new.jwk", tmp_path / "old.jwk"
    keys.write_new(new, keys.generate("EdDSA"))
    keys.write_new(old, keys.generate("ES256"))
    signer = local_key.build({"key_files": [str(new), str(old)]}, context(tmp_path))
    jwks = await signer.public_jwks()
    assert [k["kid"] for k in jwks["keys"]] == [keys.load(new)["kid"], keys.load(old)["kid"]]
    tokens = await assert_signer_conforms(signer)
    import jwt

    assert {jwt.get_unverified_header(t)["kid"] for t in tokens} == {keys.load(new)["kid"]}


def test_generate_creates_a_private_key_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "signing.jwk"
    signer = local_key.build({"key_file": str(path), "generate": True}, context(tmp_path))
    assert signer.algorithm == "EdDSA"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = local_key.build({"key_file": str(path), "generate": True}, context(tmp_path))
    assert again.signing_key["kid"] == signer.signing_key["kid"], "an existing key is kept"


def test_write_new_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.jwk"
    keys.write_new(path, keys.generate("EdDSA"))
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        keys.write_new(path, keys.generate("EdDSA"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["k.jwk"], "no temporary file left"


def test_option_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(PluginConfigError) as raised:
        local_key.build({"generate": "yes", "algorithm": "HS256", "colour": 1}, context(tmp_path))
    assert sorted(raised.value.messages) == [
        "algorithm: must be EdDSA, ES256, ES384, RS256 or PS256",
        "colour: unknown key",
        "generate: must be true or false, not str",
    ]
    with pytest.raises(PluginConfigError) as raised:
        local_key.build({"key_file": "a.jwk", "key_files": []}, context(tmp_path))
    assert sorted(raised.value.messages) == [
        "key_file and key_files: give one of them",
        "key_files: must be a non-empty list of paths",
    ]


def test_missing_public_or_symmetric_keys_are_refused(tmp_path: Path) -> None:
    public = tmp_path / "public.jwk"
    public.write_text(keys.generate("EdDSA").export_public())
    symmetric = tmp_path / "oct.jwk"
    from jwcrypto.jwk import JWK

    symmetric.write_text(JWK.generate(kty="oct", size=256).export())
    for path, words in ((tmp_path / "none.jwk", "cannot read"), (public, "public key"), (symmetric, "private key")):
        with pytest.raises(PluginConfigError) as raised:
            local_key.build({"key_file": str(path)}, context(tmp_path))
        assert words in raised.value.messages[0]


def test_check_mode_reports_problems_but_generates_nothing(tmp_path: Path) -> None:
    """jwtlet check-config builds the signer only to check it: `generate: true` must not write the key."""
    path = tmp_path / "sub" / "signing.jwk"
    local_key.build({"key_file": str(path), "generate": True}, context(tmp_path, check_only=True))
    assert not path.exists() and not path.parent.exists()
    with pytest.raises(PluginConfigError) as raised:
        local_key.build({"key_files": [str(path), str(tmp_path / "old.jwk")], "generate": True},
                        context(tmp_path, check_only=True))
    assert raised.value.messages[0].startswith("key_file: ") and "old.jwk" in raised.value.messages[0]
    assert not path.exists()
