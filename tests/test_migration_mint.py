"""
jwt-generator users moving to ``jwtlet mint`` (migration.md, "jwt-generator"):
a token file another uid can read through the pod's group, ``JWT_ISSUER``,
registered claims ``--claim`` cannot replace, and short secrets still refused
with the way out.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import jwt as pyjwt
import pytest

from jwtlet import mint
from jwtlet.testing.process import bin_path

SECRET = "0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000


def run(tmp_path: Path, arguments: list[str], capsys: pytest.CaptureFixture[str], **env: str) -> tuple[int, str]:
    environ = {"SERVICE_NAME": "feed", "OUTPUT_PATH": str(tmp_path / "out" / "token"), "JWT_SECRET": SECRET, **env}
    status = mint.mint(arguments, environ, now=NOW)
    return status, capsys.readouterr().err


def claims_of(tmp_path: Path) -> dict[str, object]:
    decoded: dict[str, object] = pyjwt.decode((tmp_path / "out" / "token").read_text(), SECRET, algorithms=["HS256"],
                                              options={"verify_exp": False, "verify_iat": False})
    return decoded


def mode_of(tmp_path: Path) -> int:
    return stat.S_IMODE((tmp_path / "out" / "token").stat().st_mode)


def test_the_token_file_is_0600_unless_told_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, [], capsys)[0] == 0
    assert mode_of(tmp_path) == 0o600


@pytest.mark.parametrize(
    "arguments, env, mode",
    [
        (["--mode", "0640"], {}, 0o640),
        ([], {"OUTPUT_MODE": "0640"}, 0o640),
        ([], {"OUTPUT_MODE": "440"}, 0o440),
        (["--mode", "0600"], {"OUTPUT_MODE": "0640"}, 0o600),
    ],
)
def test_mode_lets_the_pods_group_read_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], env: dict[str, str], mode: int
) -> None:
    """
    An application container running as another uid reads the token through
    the pod's ``fsGroup`` with ``0640``; ``--mode`` wins over ``OUTPUT_MODE``.
    """
    assert run(tmp_path, arguments, capsys, **env)[0] == 0
    assert mode_of(tmp_path) == mode


def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    """As an init container runs it: a real process with a strict umask still writes 0640."""
    output = tmp_path / "token"
    environment = {k: v for k, v in os.environ.items() if k not in ("SERVICE_NAME", "OUTPUT_PATH", "JWT_SECRET_KEY")}
    environment.update(SERVICE_NAME="feed", OUTPUT_PATH=str(output), JWT_SECRET=SECRET, OUTPUT_MODE="0640")
    result = subprocess.run(  # noqa: S603 - our own console script
        ["sh", "-c", f'umask 077 && exec "{bin_path("jwtlet")}" mint'], capture_output=True, text=True,
        env=environment, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o640


@pytest.mark.parametrize("mode", ["0644", "0666", "0604", "0750", "4640", "0040", "640a", "rw-r-----", "0o1000"])
def test_a_mode_that_exposes_the_token_beyond_owner_and_group_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """An operator asking for a world-readable (or executable, or owner-unreadable) token file gets exit 2, no file."""
    status, err = run(tmp_path, ["--mode", mode], capsys)
    assert status == 2
    assert err.startswith(f"jwtlet mint: --mode {mode}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_output_mode_is_named_when_it_is_the_bad_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(tmp_path, [], capsys, OUTPUT_MODE="0644")
    assert status == 2 and "OUTPUT_MODE 0644" in err and "fsGroup" in err


@pytest.mark.parametrize(
    "arguments, env, issuer",
    [
        ([], {}, "jwtlet-mint"),
        ([], {"JWT_ISSUER": "https://feed.example"}, "https://feed.example"),
        (["--issuer", "cli"], {"JWT_ISSUER": "https://feed.example"}, "cli"),
    ],
)
def test_the_issuer_comes_from_the_flag_then_jwt_issuer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], env: dict[str, str], issuer: str
) -> None:
    assert run(tmp_path, arguments, capsys, **env)[0] == 0
    assert claims_of(tmp_path)["iss"] == issuer


@pytest.mark.parametrize("claim", mint.PROTECTED_CLAIMS)
def test_claim_never_replaces_a_registered_claim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], claim: str
) -> None:
    """
    ``--claim sub=admin --claim exp=9999999999``: whoever sets the init
    container's arguments cannot mint an admin token that never expires.
    """
    status, err = run(tmp_path, ["--claim", "tier=3", "--claim", f"{claim}=9999999999"], capsys)
    assert status == 2
    assert err == f"jwtlet mint: --claim {claim}: '{claim}' is set by jwtlet mint and cannot be replaced\n"
    assert not (tmp_path / "out").exists()


def test_other_claims_are_still_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path, ["--claim", "tier=3", "--claim", "org=mlab"], capsys)[0] == 0
    claims = claims_of(tmp_path)
    assert (claims["tier"], claims["org"], claims["sub"], claims["iat"]) == (3, "mlab", "feed", NOW)


@pytest.mark.parametrize("secret", ["hunter2", "x" * 31])
def test_a_short_shared_secret_is_refused_saying_why_and_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], secret: str
) -> None:
    """jwt-generator signed with any secret; a short HS256 secret is guessable from one token, so jwtlet refuses it."""
    status, err = run(tmp_path, [], capsys, JWT_SECRET=secret)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "at least 32 bytes" in err and "guessed" in err and "openssl rand -base64 48" in err
    assert not (tmp_path / "out").exists()
