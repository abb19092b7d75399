"""
``jwtlet apikey create|list|revoke``: provisioning API keys directly in the
configured store, without a running daemon.  A created key is printed once.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Awaitable, Callable, Optional, TextIO

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import react

from jwtlet.apikeys import keys as apikeys
from jwtlet.config import Config, ConfigError
from jwtlet.interfaces import Conflict, DependencyUnavailable, NotFound, PluginConfigError, PluginContext
from jwtlet.model import ApiKeyRecord, Integration
from jwtlet.providers import Store


def _with_store(args: argparse.Namespace, work: Callable[[Store, Config], Awaitable[int]]) -> int:
    from jwtlet.daemon.plugins import as_service, build_provider
    from jwtlet.daemon.wiring import load_checked

    try:
        config, discovered = load_checked(args.config, os.environ)
    except ConfigError as error:
        sys.stderr.write("".join(f"{problem}\n" for problem in error.problems))
        return 1
    status = [1]

    async def main(reactor: IReactorTime) -> None:
        context = PluginContext(reactor=reactor, clock=reactor, http_client=None, config=config,
                                data_dir=config.data_dir, random_bytes=os.urandom)
        try:
            store = build_provider(config, discovered, "store", config.storage_backend, context)
        except PluginConfigError as error:
            sys.stderr.write("".join(f"{message}\n" for message in error.messages))
            return
        assert isinstance(store, Store)
        service = as_service(store)
        if service is not None:
            service.startService()
        try:
            status[0] = await work(store, config)
        except DependencyUnavailable as error:
            sys.stderr.write(f"jwtlet apikey: the store is unavailable: {error}\n")
        finally:
            if service is not None:
                await maybeDeferred(service.stopService)

    def run(reactor: IReactorTime) -> Deferred[None]:
        return ensureDeferred(main(reactor))

    try:
        react(run)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return int(exit_.code) if isinstance(exit_.code, int) else 1
    return status[0]


def create(args: argparse.Namespace, out: TextIO) -> int:
    if not apikeys.valid_id(args.integration) or (args.key_id is not None and not apikeys.valid_id(args.key_id)):
        sys.stderr.write("jwtlet apikey: ids are 1 to 64 letters, digits, '-' or '_'\n")
        return 2

    async def work(store: Store, config: Config) -> int:
        configured = tuple(config.api_keys.profiles) if config.api_keys else ()
        try:
            profiles = apikeys.bound_profiles(args.profile, configured)
        except ValueError as error:
            sys.stderr.write(f"jwtlet apikey: {error}\n")
            return 2
        try:
            await store.add_integration(Integration(args.integration, args.description, profiles=profiles))
        except Conflict:
            # Keys are added to an existing integration, which keeps the profiles it was created with.
            if args.profile is not None and not await _bound_as(store, args.integration, profiles):
                sys.stderr.write(f"jwtlet apikey: {args.integration} exists, bound to other profiles; "
                                 "--profile applies when an integration is created\n")
                return 1
        prefix = config.api_keys.prefix if config.api_keys else "jwtk"
        made = apikeys.make_key(prefix, args.integration, args.key_id, os.urandom)
        record = ApiKeyRecord(args.integration, made.key_id, made.secret_sha256, tier=args.tier,
                              description=args.description)
        try:
            await store.add_api_key(record)
        except Conflict:
            sys.stderr.write(f"jwtlet apikey: key id {made.key_id} already exists in {args.integration}\n")
            return 1
        out.write(made.text + "\n")
        sys.stderr.write(f"created key {made.key_id} for {args.integration}; it is shown only this once\n")
        return 0

    return _with_store(args, work)


async def _bound_as(store: Store, integration_id: str, profiles: Optional[tuple[str, ...]]) -> bool:
    return any(found.integration_id == integration_id and found.profiles == profiles
               for found in await store.list_integrations())


def _tier(text: str) -> int:
    """``--tier``: refused as the management API refuses it (a negative tier, say)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not apikeys.valid_tier(value):
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {apikeys.MAX_TIER}")
    return value


def list_keys(args: argparse.Namespace, out: TextIO) -> int:
    async def work(store: Store, config: Config) -> int:
        for integration in await store.list_integrations():
            if args.integration and integration.integration_id != args.integration:
                continue
            for key in integration.keys:
                out.write(f"{integration.integration_id}\t{key.key_id}\t{key.tier}\t{key.status}\t"
                          f"{key.description}\n")
        return 0

    return _with_store(args, work)


def revoke(args: argparse.Namespace, out: TextIO) -> int:
    async def work(store: Store, config: Config) -> int:
        try:
            found = await store.revoke_api_key(args.integration, args.key_id)
        except NotFound:
            found = False
        if not found:
            sys.stderr.write(f"jwtlet apikey: no key {args.key_id} in {args.integration}\n")
            return 1
        out.write(f"revoked {args.integration} {args.key_id}\n")
        return 0

    return _with_store(args, work)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``apikey`` subcommand tree of the ``jwtlet`` command."""
    apikey = commands.add_parser("apikey", help="create, list and revoke API keys in the configured store")
    actions = apikey.add_subparsers(dest="action", required=True, metavar="ACTION")
    made = actions.add_parser("create", help="create a key (and its integration if missing); prints it once")
    made.add_argument("--config", required=True)
    made.add_argument("--integration", required=True)
    made.add_argument("--tier", type=_tier, default=0)
    made.add_argument("--profile", action="append",
                      help="an api_keys profile the integration's keys may get tokens for (repeatable; "
                           "required with several profiles when the integration is created)")
    made.add_argument("--description", default="")
    made.add_argument("--key-id")
    made.set_defaults(handler=create)
    listed = actions.add_parser("list", help="list keys (never their secrets)")
    listed.add_argument("--config", required=True)
    listed.add_argument("--integration")
    listed.set_defaults(handler=list_keys)
    gone = actions.add_parser("revoke", help="revoke a key; it stops working at once")
    gone.add_argument("--config", required=True)
    gone.add_argument("integration")
    gone.add_argument("key_id")
    gone.set_defaults(handler=revoke)
