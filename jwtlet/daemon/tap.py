"""
The twistd plugin: ``twistd -n jwtlet --config PATH`` (or ``--dev``).
``Options`` checks the config before anything starts; ``makeService`` builds
the daemon.  Every config problem is printed to stderr and the process exits
with status 1 before a port opens.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.python import usage

from jwtlet import logs
from jwtlet.config.schema import ConfigError


def fail(problems: list[str]) -> NoReturn:
    sys.stderr.write("jwtlet: invalid configuration:\n")
    for problem in problems:
        sys.stderr.write(f"  {problem}\n")
    sys.stderr.flush()
    raise SystemExit(1)


class Options(usage.Options):
    synopsis = "[--config PATH] [--dev] [--data-dir DIR]"
    longdesc = "OAuth 2.0 token exchange daemon: a token exchange site and a management site."
    optParameters = [
        ["config", "c", None, "YAML or TOML config file (default: $JWTLET_CONFIG_FILE)"],
        ["data-dir", "d", None, "directory for --dev data (default: ./jwtlet-data)"],
    ]
    optFlags = [["dev", None, "run on the embedded development defaults (loopback only)"]]

    def postOptions(self) -> None:
        from jwtlet.daemon.wiring import load_checked

        parent: Any = getattr(self, "parent", None)
        if parent is not None and parent.get("logger") is None:
            parent["logger"] = logs.OBSERVER_NAME
        try:
            self.config, self.discovered = load_checked(
                self["config"], os.environ, dev=bool(self["dev"]), data_dir=self["data-dir"]
            )
        except ConfigError as error:
            fail(error.problems)
        logfile = parent.get("logfile") if parent is not None else None
        level = os.environ.get("JWTLET_LOG_LEVEL") or self.config.logging.level
        logs.configure(logs.LogSettings(format=self.config.logging.format, level=level, logfile=logfile))


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from jwtlet.daemon.wiring import make_service

    try:
        return make_service(options.config, options.discovered, reactor)
    except ConfigError as error:
        fail(error.problems)
