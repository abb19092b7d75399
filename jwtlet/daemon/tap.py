"""
The twistd plugin: ``twistd -n jwtlet --config PATH`` (or ``--dev``).
``Options`` checks the config before anything starts; ``makeService`` builds
the daemon.  Every config problem is printed to stderr and the process exits
with status 1 before a port opens.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, NoReturn, Optional

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.python import usage
from twisted.python.components import Componentized

from jwtlet import logs
from jwtlet.config import ConfigError


def fail(problems: list[str]) -> NoReturn:
    sys.stderr.write("jwtlet: invalid configuration:\n")
    for problem in problems:
        sys.stderr.write(f"  {problem}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def log_level(configured: Optional[str], environ: Mapping[str, str]) -> str:
    """
    ``JWTLET_LOG_LEVEL``, else ``logging.level``, else ``RUST_LOG`` (so a
    Rust jwtlet's manifest keeps its verbosity), else ``info``.
    """
    return environ.get("JWTLET_LOG_LEVEL") or configured or logs.rust_log_level(environ.get("RUST_LOG")) or "info"


class Options(usage.Options):
    synopsis = "[--config PATH] [--dev] [--data-dir DIR]"
    longdesc = "OAuth 2.0 token exchange daemon: a token exchange site and a management site."
    optParameters = [
        ["config", "c", None, "YAML or TOML config file (default: $JWTLET_CONFIG_FILE)"],
        ["data-dir", "d", None, "directory for --dev data (default: ./jwtlet-data)"],
        ["worker-of", None, None, "internal: serve as a worker of the supervising process with this PID"],
    ]
    optFlags = [["dev", None, "run on the embedded development defaults (loopback only)"]]

    def postOptions(self) -> None:
        from jwtlet.daemon.wiring import check

        parent: Optional[usage.Options] = getattr(self, "parent", None)
        try:
            self.config, self.discovered = check(
                self["config"], os.environ, dev=bool(self["dev"]), data_dir=self["data-dir"]
            )
        except ConfigError as error:
            fail(error.problems)
        logfile = parent.get("logfile") if parent is not None else None
        level = log_level(self.config.logging.level, os.environ)
        self.log_settings = logs.LogSettings(format=self.config.logging.format, level=level, logfile=logfile)


class WithLogObserver(MultiService):
    """
    The daemon, giving twistd the log observer of its config: twistd hands
    this service its application before it starts logging, and logs to the
    application's ``ILogObserver`` unless ``--logger`` names another.
    """

    def __init__(self, daemon: IService, settings: logs.LogSettings):
        super().__init__()
        self.settings = settings
        daemon.setServiceParent(self)

    def setServiceParent(self, parent: IServiceCollection) -> None:  # type: ignore[override]
        if isinstance(parent, Componentized):
            logs.install(parent, self.settings)
        super().setServiceParent(parent)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from jwtlet.daemon.wiring import make_service
    from jwtlet.daemon.workers import daemon_service

    try:
        return WithLogObserver(daemon_service(options, reactor, make_service), options.log_settings)
    except ConfigError as error:
        fail(error.problems)
