"""
The ``jwtlet`` command: ``run``, ``dev``, ``check-config``, ``plugins``,
``dev-token``, ``keygen`` (and, from their own modules, ``apikey`` and
``mint``), and ``jwtlet-server``, the Rust jwtlet's.  Each subcommand returns an exit status; nothing here starts a
reactor except ``run``/``dev``, which hand over to twistd.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

from jwtlet import keys, mint
from jwtlet.cli import apikey
from jwtlet.config import CONFIG_FILE_ENV, DEFAULT_DATA_DIR, ConfigError, load_raw


def run_twistd(arguments: Sequence[str]) -> int:
    """``twistd -n --pidfile= jwtlet ARGS``: the daemon in the foreground."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "--pidfile=", "jwtlet", *arguments]
    run()
    return 0


def daemon_arguments(args: argparse.Namespace) -> list[str]:
    arguments = []
    if getattr(args, "config", None):
        arguments += ["--config", args.config]
    if getattr(args, "dev", False):
        arguments.append("--dev")
    if args.data_dir:
        arguments += ["--data-dir", args.data_dir]
    return arguments


def command_run(args: argparse.Namespace, out: TextIO) -> int:
    return run_twistd(daemon_arguments(args))


def command_dev(args: argparse.Namespace, out: TextIO) -> int:
    args.dev = True
    return run_twistd(daemon_arguments(args))


def command_check_config(args: argparse.Namespace, out: TextIO) -> int:
    """The checks the daemon runs at start, plugins' own options included; nothing is created."""
    from jwtlet.daemon.wiring import check

    try:
        check(args.config, os.environ, dev=args.dev, data_dir=args.data_dir)
    except ConfigError as error:
        sys.stderr.write("".join(f"{problem}\n" for problem in error.problems))
        return 1
    out.write("configuration OK\n")
    return 0


def command_plugins(args: argparse.Namespace, out: TextIO) -> int:
    from jwtlet.discovery import discover

    plugin_dirs: list[str] = []
    if args.config or os.environ.get(CONFIG_FILE_ENV):
        try:
            raw = load_raw(args.config, os.environ)
        except ConfigError as error:
            sys.stderr.write("".join(f"{problem}\n" for problem in error.problems))
            return 1
        found = raw.get("plugin_dirs")
        plugin_dirs = [d for d in found if isinstance(d, str)] if isinstance(found, list) else []
    discovered = discover(plugin_dirs)
    for plugin in discovered.plugins:
        out.write(f"{plugin.kind}\t{plugin.name}\t{plugin.module}\t{plugin.description}\n")
    for module, reason in sorted(discovered.failures.items()):
        out.write(f"failed\t{module}\t{reason}\n")
    return 0


def command_dev_token(args: argparse.Namespace, out: TextIO) -> int:
    from jwtlet.daemon import dev

    namespace, _, name = args.account.partition(":")
    if not namespace or not name or ":" in name:
        sys.stderr.write("jwtlet dev-token: give the service account as NAMESPACE:NAME\n")
        return 2
    data_dir = Path(args.data_dir or DEFAULT_DATA_DIR)
    token = dev.mint(data_dir, namespace, name, int(time.time()), audience=args.audience, ttl=args.ttl)
    out.write(token + "\n")
    return 0


def command_keygen(args: argparse.Namespace, out: TextIO) -> int:
    path = Path(args.out)
    try:
        keys.write_new(path, keys.generate(args.alg))
    except FileExistsError:
        sys.stderr.write(f"jwtlet keygen: {path} exists; refusing to overwrite it\n")
        return 1
    out.write(f"wrote {args.alg} key {keys.load(path)['kid']} to {path}\n")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def parser() -> argparse.ArgumentParser:
    from jwtlet.daemon.dev import CLIENT_AUDIENCE

    top = argparse.ArgumentParser(prog="jwtlet", description="OAuth 2.0 token exchange daemon")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace, TextIO], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    run = add("run", command_run, "run the daemon in the foreground (twistd -n jwtlet)")
    run.add_argument("--config")
    # The Rust jwtlet's manifests give the path positionally (``jwtlet-server PATH``).
    run.add_argument("path", nargs="?", metavar="PATH", help="the config file (the same as --config PATH)")
    run.add_argument("--dev", action="store_true")
    run.add_argument("--data-dir")
    dev = add("dev", command_dev, "run the daemon on the embedded development defaults")
    dev.add_argument("--data-dir")
    check = add("check-config", command_check_config, "validate a config and list every problem")
    check.add_argument("--config")
    check.add_argument("--dev", action="store_true")
    check.add_argument("--data-dir")
    plugins = add("plugins", command_plugins, "list discovered plugins and import failures")
    plugins.add_argument("--config")
    token = add("dev-token", command_dev_token, "print a subject token signed by the --dev issuer")
    token.add_argument("account", metavar="NAMESPACE:NAME")
    token.add_argument("--audience", default=CLIENT_AUDIENCE)
    token.add_argument("--ttl", type=_positive_int, default=3600)
    token.add_argument("--data-dir")
    keygen = add("keygen", command_keygen, "write a new private JWK (mode 0600)")
    keygen.add_argument("--alg", required=True, choices=keys.ALGORITHMS)
    keygen.add_argument("--out", required=True)
    apikey.add_commands(commands)
    mint = commands.add_parser("mint", help="write one signed token to a file (init containers)", add_help=False)
    mint.set_defaults(handler=None)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["mint"]:
        # mint has its own parser: its flags and environment are the jwt-generator contract.
        return mint.mint(arguments[1:], os.environ)
    top = parser()
    args = top.parse_args(arguments)
    path = getattr(args, "path", None)
    if path is not None:
        if args.config is not None and args.config != path:
            top.error(f"the config file is given twice: {path} and --config {args.config}")
        args.config = path
    return int(args.handler(args, sys.stdout))


def server(argv: Optional[Sequence[str]] = None) -> int:
    """
    ``jwtlet-server [PATH]``, the Rust jwtlet's command line: the config path
    as the one positional argument, ``jwtlet run --config PATH`` otherwise.
    """
    top = argparse.ArgumentParser(prog="jwtlet-server", description="run jwtlet as the Rust jwtlet's image does")
    top.add_argument("path", nargs="?", metavar="PATH", help="the config file (default: $JWTLET_CONFIG_FILE)")
    args = top.parse_args(list(sys.argv[1:] if argv is None else argv))
    return main(["run", *(["--config", args.path] if args.path else [])])


if __name__ == "__main__":
    raise SystemExit(main())
