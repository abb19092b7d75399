"""The ``jwtlet`` command's subcommands, in process."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import jwt as pyjwt
import pytest

from jwtlet import keys
from jwtlet.cli import main as cli
from jwtlet.daemon import dev


def test_check_config_lists_every_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuer: ftp://x\ntoken: {audience: a}\nsurprise: 1\n")
    assert cli.main(["check-config", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "issuer: must be an absolute https URL" in err
    assert "token.client_audience: required" in err
    assert "surprise: unknown key" in err


def test_check_config_accepts_the_dev_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "--dev", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "configuration OK\n"


def test_plugins_lists_kind_name_module_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plugins"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert all(len(row) == 4 for row in rows if row[0] != "failed")
    names = {(row[0], row[1]) for row in rows}
    assert {("store", "sqlite"), ("store", "postgres"), ("store", "memory"), ("signer", "local-key"),
            ("signer", "vault-transit"), ("validator", "kubernetes-oidc"), ("validator", "kubernetes-tokenreview"),
            ("validator", "api-key")} <= names


@pytest.mark.parametrize("algorithm", keys.ALGORITHMS)
def test_keygen_writes_a_private_jwk_once(tmp_path: Path, algorithm: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "key.jwk"
    assert cli.main(["keygen", "--alg", algorithm, "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = json.loads(out.read_text())
    assert key["alg"] == algorithm and key["kid"] == keys.load(out).thumbprint()
    assert cli.main(["keygen", "--alg", algorithm, "--out", str(out)]) == 1, "never overwrites"


def test_dev_token_is_signed_by_the_dev_issuer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dev-token", "default:demo", "--data-dir", str(tmp_path), "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    (key,) = json.loads((tmp_path / dev.ISSUER_JWKS).read_text())["keys"]
    claims = pyjwt.decode(token, pyjwt.PyJWK.from_dict(key), algorithms=["ES256"], audience="jwtlet-dev")
    assert claims["iss"] == dev.ISSUER and claims["sub"] == "system:serviceaccount:default:demo"
    assert claims["exp"] - claims["iat"] == 60
    assert cli.main(["dev-token", "no-colon"]) == 2
