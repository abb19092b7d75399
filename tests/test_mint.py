"""``jwtlet mint`` as a subprocess, the way an init container runs it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Optional

import jwt as pyjwt
import pytest

from jwtlet import keys
from jwtlet.testing.process import bin_path

SECRET = "0123456789abcdef0123456789abcdef"


def mint(
    tmp_path: Path, arguments: list[str], env: Optional[dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("SERVICE_NAME", "OUTPUT_PATH", "JWT_SECRET_KEY", "JWT_SECRET")}
    environment.update(env or {})
    return subprocess.run(  # noqa: S603
        [bin_path("jwtlet"), "mint", *arguments], capture_output=True, text=True, env=environment,
        cwd=tmp_path, timeout=60,
    )


def test_env_only(tmp_path: Path) -> None:
    output = tmp_path / "shared" / "nested" / "token"
    result = mint(tmp_path, [], {"SERVICE_NAME": "feed", "OUTPUT_PATH": str(output), "JWT_SECRET_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"token written to {output}\n"
    token = output.read_text()
    assert not token.endswith("\n") and token.count(".") == 2
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    claims = pyjwt.decode(token, SECRET, algorithms=["HS256"])
    assert (claims["iss"], claims["sub"], claims["role"]) == ("jwtlet-mint", "feed", "service")
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]


def test_flags_only_with_claims_audience_and_no_expiry(tmp_path: Path) -> None:
    output = tmp_path / "token"
    result = mint(tmp_path, ["--service-name", "feed", "--output-path", str(output), "--issuer", "me",
                             "--audience", "api", "--claim", "tier=3", "--claim", 'scopes=["a","b"]',
                             "--claim", "note=plain text", "--role", "admin", "--no-expiry", "--ttl", "5"],
                  {"JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = pyjwt.decode(output.read_text(), SECRET, algorithms=["HS256"], audience="api")
    assert "exp" not in claims
    assert (claims["iss"], claims["role"], claims["tier"], claims["scopes"], claims["note"]) == (
        "me", "admin", 3, ["a", "b"], "plain text")


def test_an_asymmetric_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key.jwk"
    keys.write_new(key_file, keys.generate("ES256"))
    output = tmp_path / "token"
    result = mint(tmp_path, ["--service-name", "feed", "--output-path", str(output), "--key-file", str(key_file),
                             "--ttl", "60"])
    assert result.returncode == 0, result.stderr
    public = keys.public_jwk(keys.load(key_file), "ES256")
    token = output.read_text()
    assert pyjwt.get_unverified_header(token)["kid"] == public["kid"]
    claims = pyjwt.decode(token, pyjwt.PyJWK.from_dict(public), algorithms=["ES256"])
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize(
    "arguments, env, words",
    [
        ([], {"OUTPUT_PATH": "t", "JWT_SECRET_KEY": SECRET}, "no service name"),
        ([], {"SERVICE_NAME": "s", "JWT_SECRET_KEY": SECRET}, "no output path"),
        ([], {"SERVICE_NAME": "s", "OUTPUT_PATH": "t"}, "no signing key"),
        ([], {"SERVICE_NAME": "s", "OUTPUT_PATH": "t", "JWT_SECRET_KEY": "short"}, "at least 32 bytes"),
        (["--key-file", "/nonexistent.jwk"], {"SERVICE_NAME": "s", "OUTPUT_PATH": "t"}, "cannot read"),
    ],
)
def test_each_missing_or_invalid_input_exits_2_with_one_line_and_no_file(
    tmp_path: Path, arguments: list[str], env: dict[str, str], words: str
) -> None:
    result = mint(tmp_path, arguments, env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr
    assert list(tmp_path.iterdir()) == [], "no file left behind"


def test_a_bad_key_file_leaves_no_partial_file(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.mkdir()
    (bad / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    output = tmp_path / "out" / "token"
    result = mint(tmp_path, ["--service-name", "s", "--output-path", str(output), "--key-file",
                             str(bad / "bad.pem")])
    assert result.returncode == 2
    assert not output.exists() and not output.parent.exists()
