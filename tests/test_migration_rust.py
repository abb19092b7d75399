"""
A Rust jwtlet's manifest and config, run by jwtlet unchanged (migration.md,
"The Rust jwtlet"): ``jwtlet-server PATH``, ``RUST_LOG``, the Vault key named
after ``participant_context_claim``, and every ``storage_backend.pool`` key
where the Rust jwtlet reads it.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import types
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import jwt as pyjwt
import psycopg_pool
import pytest
import pytest_twisted
import yaml
from psycopg.conninfo import conninfo_to_dict
from vault_fixtures import ROOT, RunningVault, running_vault, signer_context

from jwtlet import keys
from jwtlet.cli import main as cli
from jwtlet.daemon import dev as devissuer
from jwtlet.daemon import tap
from jwtlet.interfaces import PluginConfigError
from jwtlet.logs import rust_log_level
from jwtlet.plugins.postgres_store import PoolOptions, parse_duration, postgres
from jwtlet.plugins.vault_transit import vault_transit
from jwtlet.testing.conformance.signer import assert_signer_conforms
from jwtlet.testing.process import bin_path, free_port

ROOT_DIR = Path(__file__).resolve().parent.parent


# -- jwtlet-server PATH and jwtlet run PATH ------------------------------------------


@pytest.fixture
def twistd_arguments(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """What ``jwtlet run`` would hand to twistd, instead of starting it."""
    calls: list[list[str]] = []

    def run_twistd(arguments: list[str]) -> int:
        calls.append(list(arguments))
        return 0

    monkeypatch.setattr(cli, "run_twistd", run_twistd)
    return calls


def test_jwtlet_server_is_a_console_script_of_the_package() -> None:
    """The Rust image's command: ``jwtlet-server`` is installed with jwtlet, as ``jwtlet`` is."""
    setup = configparser.ConfigParser()
    setup.read(ROOT_DIR / "setup.cfg")
    scripts = dict(
        line.split("=", 1) for line in setup["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    assert {name.strip(): target.strip() for name, target in scripts.items()}["jwtlet-server"] == (
        "jwtlet.cli.main:server")


def test_jwtlet_server_path_is_jwtlet_run_config_path(twistd_arguments: list[list[str]]) -> None:
    assert cli.server(["/etc/jwtlet/config.toml"]) == 0
    assert cli.main(["run", "--config", "/etc/jwtlet/config.toml"]) == 0
    assert twistd_arguments == [["--config", "/etc/jwtlet/config.toml"]] * 2


def test_jwtlet_run_takes_the_path_positionally(twistd_arguments: list[list[str]]) -> None:
    assert cli.main(["run", "/etc/jwtlet/config.toml"]) == 0
    assert cli.main(["run", "/etc/jwtlet/config.toml", "--config", "/etc/jwtlet/config.toml"]) == 0
    assert twistd_arguments == [["--config", "/etc/jwtlet/config.toml"]] * 2


def test_jwtlet_server_without_a_path_reads_jwtlet_config_file(twistd_arguments: list[list[str]]) -> None:
    """No argument: the config comes from ``JWTLET_CONFIG_FILE``, as the Rust jwtlet's did."""
    assert cli.server([]) == 0
    assert twistd_arguments == [[]]


def test_two_different_config_paths_are_refused(
    twistd_arguments: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "a.toml", "--config", "b.toml"])
    assert exited.value.code == 2
    assert "given twice" in capsys.readouterr().err
    assert twistd_arguments == []


def serve_config(tmp_path: Path) -> Path:
    keys.write_new(tmp_path / "signing.jwk", keys.generate("EdDSA"))
    devissuer.ensure(tmp_path)  # an issuer the validator trusts; no Kubernetes needed
    config = {
        "issuer": "http://127.0.0.1:8080",
        "bind": "127.0.0.1",
        "token": {"client_audience": "https://kubernetes.default.svc", "audience": "svc"},
        "storage_backend": {"type": "memory"},
        "validator": devissuer.defaults(tmp_path)["validator"],
        "signer": {"type": "local-key", "key_file": str(tmp_path / "signing.jwk")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_jwtlet_server(tmp_path: Path, path: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """
    ``jwtlet-server PATH`` as its console-script wrapper runs it; answers
    ``/health``, then stops.  The exit status and the log lines.
    """
    token_port, management_port = free_port(), free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("JWTLET", "RUST_LOG"))}
    environment.update(env, JWTLET__TOKEN_EXCHANGE_PORT=str(token_port), JWTLET__MANAGEMENT_PORT=str(management_port))
    process = subprocess.Popen(  # noqa: S603 - the console script installed beside our interpreter
        [bin_path("jwtlet-server"), str(path)],
        cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{token_port}/health"
        for _ in range(300):
            if process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                    assert response.status == 200
                    break
            except OSError:
                try:
                    process.wait(timeout=0.1)  # a real process starting: wall-clock polling, bounded
                except subprocess.TimeoutExpired:
                    pass
        else:
            raise AssertionError("jwtlet-server did not answer /health")
        process.terminate()
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, output.splitlines()


def test_a_rust_manifest_command_starts_jwtlet_and_rust_log_sets_its_level(tmp_path: Path) -> None:
    """
    The Rust image's ``command: [jwtlet-server, /etc/jwtlet/config.yaml]``
    with ``RUST_LOG=error`` serves, and logs nothing below error (twistd's
    own "starting" lines are info).
    """
    status, lines = run_jwtlet_server(tmp_path, serve_config(tmp_path), {"RUST_LOG": "error"})
    assert status in (0, -15), lines  # twistd re-raises SIGTERM after a clean stop (cli.md)
    levels = {json.loads(line)["level"] for line in lines if line.startswith("{")}
    assert levels <= {"error", "critical"}, lines


# -- RUST_LOG -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, level",
    [
        ("error", "error"),
        ("warn", "warn"),
        ("INFO", "info"),
        ("debug", "debug"),
        ("trace", "debug"),
        ("info,jwtlet=debug", "debug"),
        ("debug,jwtlet=warn", "warn"),
        ("warn,jwtlet_server=trace,jwtlet_postgres=info", "debug"),
        ("jwtlet::exchange=error", "error"),
        ("info,sqlx=trace,hyper=debug", "info"),
        ("jwtlet", "debug"),
        ("off", "critical"),
        ("3", "info"),
        ("", None),
        ("sqlx=debug", None),
        ("info,jwtlet=loud", None),
    ],
)
def test_rust_log_directives_as_jwtlet_levels(value: str, level: Optional[str]) -> None:
    """A bare level is the default; a directive naming jwtlet wins; others name libraries jwtlet does not have."""
    assert rust_log_level(value) == level


@pytest.mark.parametrize(
    "configured, environ, level",
    [
        (None, {}, "info"),
        (None, {"RUST_LOG": "info,jwtlet=debug"}, "debug"),
        ("warn", {"RUST_LOG": "debug"}, "warn"),
        (None, {"RUST_LOG": "debug", "JWTLET_LOG_LEVEL": "error"}, "error"),
        ("warn", {"JWTLET_LOG_LEVEL": "error"}, "error"),
        (None, {"RUST_LOG": "not a filter=at all"}, "info"),
    ],
)
def test_rust_log_is_honoured_only_when_logging_level_and_jwtlet_log_level_are_unset(
    configured: Optional[str], environ: dict[str, str], level: str
) -> None:
    assert tap.log_level(configured, environ) == level


# -- vault.key_name ---------------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def vault() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


@pytest_twisted.ensureDeferred
async def test_the_vault_key_follows_participant_context_claim_so_kids_carry_over(
    tmp_path: Path, vault: RunningVault
) -> None:
    """
    A Rust jwtlet with ``participant_context_claim = "pc"`` signed with the
    transit key ``signing-pc``: jwtlet signs with that same key and its kids,
    and creates no new one.
    """
    rust_key = vault.fake.create_key("signing-pc")
    context = signer_context(tmp_path)
    context.config.token.participant_context_claim = "pc"
    signer = vault_transit.build({"url": vault.url, "token": ROOT}, context)
    try:
        tokens = await assert_signer_conforms(signer)
    finally:
        await signer.stopService()
    assert {pyjwt.get_unverified_header(token)["kid"] for token in tokens} == {"signing-pc-1"}
    assert set(vault.fake.keys) == {"signing-pc"} and vault.fake.keys["signing-pc"] is rust_key


def test_an_explicit_key_name_still_wins(tmp_path: Path) -> None:
    context = signer_context(tmp_path)
    context.config.token.participant_context_claim = "pc"
    signer = vault_transit.build({"url": "https://vault.example", "token": ROOT, "key_name": "jwt"}, context)
    assert signer.kid(4) == "jwt-4"
    context.config.token.participant_context_claim = "jwtlet_pc"
    assert vault_transit.build({"url": "https://vault.example", "token": ROOT}, context).kid(1) == (
        "signing-jwtlet_pc-1")


# -- storage_backend.pool ------------------------------------------------------------------


def checking() -> Any:
    """A plugin context for building the store without connecting (check-config's)."""
    from twisted.internet import reactor

    return types.SimpleNamespace(reactor=reactor, clock=reactor, data_dir=".", check_only=True)


def test_every_rust_pool_key_is_read_under_pool_with_its_meaning(tmp_path: Path) -> None:
    """The Rust jwtlet's ``[storage_backend.pool]``, all eleven keys, as its docs write them."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    store = postgres.build({
        "url": "postgresql://jwtlet@db.example/jwtlet?sslmode=disable",
        "pool": {
            "max_connections": 20, "min_connections": 2, "acquire_timeout": "30s", "idle_timeout": "5m",
            "max_lifetime": "1h30m", "test_before_acquire": True, "application_name": "jwtlet-rust",
            "statement_cache_capacity": 0, "sslmode": "verify-full", "ssl_root_cert": str(ca),
            "run_migrations_on_startup": False,
        },
    }, checking())
    pool: psycopg_pool.ConnectionPool[Any] = store._pool
    assert (pool.min_size, pool.max_size, pool.timeout, pool.max_idle, pool.max_lifetime) == (
        2, 20, 30.0, 300.0, 5400.0)
    assert pool._check is psycopg_pool.ConnectionPool.check_connection
    assert pool.kwargs["application_name"] == "jwtlet-rust"
    # The pool's sslmode wins over the URL's, as in the Rust jwtlet.
    assert conninfo_to_dict(store.conninfo)["sslmode"] == "verify-full"
    assert conninfo_to_dict(store.conninfo)["sslrootcert"] == str(ca)
    assert store.run_migrations is False
    connection = types.SimpleNamespace(prepare_threshold=5, prepared_max=100)
    pool._configure(connection)
    assert connection.prepare_threshold is None, "0: no prepared statements (PgBouncer in transaction mode)"


def test_statement_cache_capacity_bounds_prepared_statements_per_connection() -> None:
    connection = types.SimpleNamespace(prepare_threshold=5, prepared_max=100)
    PoolOptions(statement_cache_capacity=25).configure(connection)  # type: ignore[arg-type]
    assert (connection.prepare_threshold, connection.prepared_max) == (5, 25)
    untouched = types.SimpleNamespace(prepare_threshold=5, prepared_max=100)
    PoolOptions().configure(untouched)  # type: ignore[arg-type]
    assert (untouched.prepare_threshold, untouched.prepared_max) == (5, 100)


def test_the_keys_jwtlet_also_reads_beside_url_may_not_be_given_twice(tmp_path: Path) -> None:
    with pytest.raises(PluginConfigError) as raised:
        postgres.build({"url": "postgresql://db/jwtlet", "sslmode": "require", "run_migrations_on_startup": True,
                        "pool": {"sslmode": "verify-full", "ssl_root_cert": str(tmp_path / "missing.pem"),
                                 "run_migrations_on_startup": False, "statement_cache_capacity": -1}},
                       checking())
    assert sorted(raised.value.messages) == sorted([
        "sslmode: given twice (also as pool.sslmode): give it in one place",
        "run_migrations_on_startup: given twice (also as pool.run_migrations_on_startup): give it in one place",
        f"pool.ssl_root_cert: no such file: {tmp_path / 'missing.pem'}",
        "pool.statement_cache_capacity: must be a whole number (0 or more)",
    ])


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1h 30m", 5400), ("250ms", 0.25), ("2min", 120),
     ("1day", 86400), ("45", 45)],
)
def test_durations_as_the_rust_jwtlet_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1h30", "30 lightyears", "-5s", "", "s"])
def test_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)
