"""
The management site (default port 8081): ``/api/v1`` for mappings, scopes,
integrations and API keys, authenticated by the caller's own token (rejected
tokens remembered for a minute) and authorised by role; audit events for
every change and every refused authorisation; ``/metrics``.

Slightly over 400 lines because it is the port's whole route table, one
handler per resource shape; who the caller is lives in :mod:`.callers`, the
JSON shapes in :mod:`.codecs`.
"""

from __future__ import annotations

import os
from typing import Awaitable, Callable, ClassVar, Mapping, Optional, ParamSpec, TypeVar, cast
from urllib.parse import quote

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from jwtlet import tracing
from jwtlet.apikeys import keys as apikeys
from jwtlet.interfaces import Conflict, DependencyUnavailable, NotFound
from jwtlet.logs import emit
from jwtlet.metrics import CONTENT_TYPE, Metrics
from jwtlet.model import ApiKeyRecord, Identity, Integration, JSONValue
from jwtlet.providers import Store, Validator
from jwtlet.web import codecs
from jwtlet.web.callers import (
    APIKEYS_WRITE,
    MAPPINGS_WRITE,
    READ,
    SCOPE_WRITE,
    RejectionCache,
    caller_identity,
    may,
)
from jwtlet.web.errors import APIError, add_error_handlers, plain_error
from jwtlet.web.health import Readiness, add_health_routes
from jwtlet.web.requests import ANY_METHOD, media_type, method_of, path_segments, read_body
from jwtlet.web.responses import json_response

log = Logger(namespace="jwtlet.management")

T = TypeVar("T")
P = ParamSpec("P")

MAX_BODY = 1024 * 1024
PREFIX = "/api/v1"

AUDIT_LEVELS = {"success": LogLevel.info, "refused": LogLevel.warn, "error": LogLevel.error}


def unauthorized() -> APIError:
    return APIError(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})


def forbidden() -> APIError:
    return APIError(403, {"error": "forbidden"})


def bad_request(message: str) -> APIError:
    return APIError(400, {"error": message})


def not_found() -> APIError:
    return APIError(404, {"error": "not_found"})


def conflict(message: str) -> APIError:
    return APIError(409, {"error": message})


async def in_api_terms(action: Callable[[], Awaitable[T]], exists: Optional[str], missing: bool) -> T:
    """``action``, with the store's answers the API has words for said in them."""
    try:
        return await action()
    except Conflict:
        if exists is None:
            raise
        raise conflict(exists) from None
    except NotFound:
        if not missing:
            raise
        raise not_found() from None


@attrs.define
class ManagementAPI:
    """The Klein app of the management port."""

    app: ClassVar[Klein] = Klein()

    store: Store
    validator: Validator
    audiences: tuple[str, ...]
    roles: Mapping[str, tuple[str, ...]]
    reserved_claims: frozenset[str]
    api_key_prefix: str
    metrics: Metrics
    metrics_enabled: bool
    readiness: Readiness
    clock: IReactorTime
    #: the callers' tokens already rejected (shared with ``/introspect``, which takes the same callers)
    callers: RejectionCache
    random_bytes: Callable[[int], bytes] = os.urandom
    #: the configured API-key profiles, which an integration is bound to some of
    api_key_profiles: tuple[str, ...] = ()

    # -- plumbing -------------------------------------------------------------

    def enter(self, request: IRequest, route: str, *allowed: str) -> str:
        """
        Count the request by route and final status once it is answered, and
        check its method (before any authentication): the method to branch on.
        """
        answered = cast(Request, request)
        answered.notifyFinish().addBoth(
            lambda _: self.metrics.management_requests.labels(route, str(answered.code)).inc()
        )
        return method_of(request, *allowed)

    async def authorise(self, request: IRequest, route: str, needed: str) -> Identity:
        identity = await caller_identity(self.callers, request.getHeader(b"authorization"), self.audiences)
        if identity is None:
            raise unauthorized()
        tracing.current().annotate(tracing.CLIENT_ATTRIBUTE, identity.username)
        roles = frozenset(self.roles.get(identity.username, ()))
        if not may(roles, needed):
            emit(log, "authz.denied", LogLevel.warn, actor=identity.username, route=route,
                 method=request.method.decode("ascii", "replace"), role=needed)
            raise forbidden()
        return identity

    def json_body(self, request: IRequest) -> JSONValue:
        body = read_body(request, MAX_BODY)
        if media_type(request) != "application/json":
            raise APIError(415, {"error": "Content-Type must be application/json"})
        try:
            return codecs.parse_json(body)
        except ValueError as error:
            raise bad_request(str(error)) from None

    async def change(
        self,
        caller: Identity,
        event: str,
        subject: Mapping[str, str],
        action: Callable[[], Awaitable[T]],
        exists: Optional[str] = None,
        missing: bool = False,
    ) -> T:
        """
        Run a store change and write its audit event: ``success`` only when
        the store acknowledged it, ``refused`` with the reason when the change
        was not allowed, ``error`` when the store failed (or the request went
        away) and the change may not have happened.  The store's ``Conflict``
        is a 409 saying ``exists``, and its ``NotFound`` a 404 when ``missing``.
        """
        try:
            result = await in_api_terms(action, exists, missing)
        except APIError as error:
            self.audit(caller, event, subject, "refused", str(error.body.get("error")))
            raise
        except DependencyUnavailable:
            self.audit(caller, event, subject, "error", "temporarily_unavailable")
            raise
        except CancelledError:
            self.audit(caller, event, subject, "error", "cancelled")
            raise
        except Exception:
            self.audit(caller, event, subject, "error", "server_error")
            raise
        self.audit(caller, event, subject, "success")
        return result

    def audit(
        self,
        caller: Identity,
        event: str,
        subject: Mapping[str, str],
        outcome: str,
        error: Optional[str] = None,
    ) -> None:
        fields = dict(subject, actor=caller.username, outcome=outcome)
        if error is not None:
            fields["error"] = error
        emit(log, event, AUDIT_LEVELS[outcome], **fields)

    def parse(self, parser: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return parser(*args, **kwargs)
        except ValueError as error:
            raise bad_request(str(error)) from None

    # -- mappings -------------------------------------------------------------

    @app.route(f"{PREFIX}/mappings", methods=["GET", "POST"])
    async def mappings(self, request: IRequest) -> bytes:
        route = f"{PREFIX}/mappings"
        if self.enter(request, route, "GET", "POST") == "GET":
            await self.authorise(request, route, READ)
            client = request.args.get(b"clientIdentifier", [None])[0]
            found = await self.store.list_mappings(client.decode("utf-8", "replace") if client else None)
            return json_response(request, [codecs.mapping_to_json(m) for m in found])
        caller = await self.authorise(request, route, MAPPINGS_WRITE)
        mapping = self.parse(codecs.mapping_from_json, self.json_body(request), self.reserved_claims)
        subject = {"clientIdentifier": mapping.client_identifier,
                   "participantContext": mapping.participant_context}

        await self.change(caller, "mapping.created", subject, lambda: self.store.add_mapping(mapping),
                          exists="mapping already exists")
        location = "/".join(
            [f"{PREFIX}/mappings", quote(mapping.client_identifier, safe=""),
             quote(mapping.participant_context, safe="")]
        )
        return json_response(request, codecs.mapping_to_json(mapping), 201, {"Location": location})

    @app.route(f"{PREFIX}/mappings/<path:_rest>", methods=ANY_METHOD)
    async def mapping(self, request: IRequest, _rest: str) -> bytes:
        segments = self.segments(request, "/mappings/")
        if len(segments) == 1:
            route = f"{PREFIX}/mappings/{{client}}"
            self.enter(request, route, "DELETE")
            return await self.delete_client(request, route, segments[0])
        if len(segments) != 2:
            raise not_found()
        route = f"{PREFIX}/mappings/{{client}}/{{context}}"
        method = self.enter(request, route, "GET", "PUT", "DELETE")
        client, context = segments
        subject = {"clientIdentifier": client, "participantContext": context}
        if method == "GET":
            await self.authorise(request, route, READ)
            try:
                found = await self.store.get_mapping(client, context)
            except NotFound:
                raise not_found() from None
            return json_response(request, codecs.mapping_to_json(found))
        caller = await self.authorise(request, route, MAPPINGS_WRITE)
        if method == "DELETE":
            await self.change(caller, "mapping.deleted", subject,
                              lambda: self.store.delete_mapping(client, context))
            return self.no_content(request)
        body = self.json_body(request)
        mapping = self.parse(codecs.mapping_from_json, body, self.reserved_claims)
        if mapping.key != (client, context):
            self.audit(caller, "mapping.updated", subject, "refused", "body names another mapping")
            raise bad_request("the body names another mapping than the path")

        await self.change(caller, "mapping.updated", subject, lambda: self.store.update_mapping(mapping), missing=True)
        return self.no_content(request)

    async def delete_client(self, request: IRequest, route: str, client: str) -> bytes:
        caller = await self.authorise(request, route, MAPPINGS_WRITE)
        await self.change(caller, "mapping.deleted_all", {"clientIdentifier": client},
                          lambda: self.store.delete_client_mappings(client))
        return self.no_content(request)

    # -- scopes ---------------------------------------------------------------

    @app.route(f"{PREFIX}/scopes", methods=["GET", "POST"])
    async def scopes(self, request: IRequest) -> bytes:
        route = f"{PREFIX}/scopes"
        if self.enter(request, route, "GET", "POST") == "GET":
            await self.authorise(request, route, READ)
            found = await self.store.list_scopes()
            return json_response(request, [codecs.scope_to_json(s) for s in found])
        caller = await self.authorise(request, route, SCOPE_WRITE)
        scope = self.parse(codecs.scope_from_json, self.json_body(request), self.reserved_claims)

        await self.change(caller, "scope.created", {"scope": scope.scope}, lambda: self.store.add_scope(scope),
                          exists="scope already exists")
        location = f"{PREFIX}/scopes/{quote(scope.scope, safe='')}"
        return json_response(request, codecs.scope_to_json(scope), 201, {"Location": location})

    @app.route(f"{PREFIX}/scopes/<path:_rest>", methods=ANY_METHOD)
    async def scope(self, request: IRequest, _rest: str) -> bytes:
        segments = self.segments(request, "/scopes/")
        if len(segments) != 1:
            raise not_found()
        route = f"{PREFIX}/scopes/{{scope}}"
        method = self.enter(request, route, "GET", "PUT", "DELETE")
        name = segments[0]
        if method == "GET":
            await self.authorise(request, route, READ)
            try:
                found = await self.store.get_scope(name)
            except NotFound:
                raise not_found() from None
            return json_response(request, codecs.scope_to_json(found))
        caller = await self.authorise(request, route, SCOPE_WRITE)
        if method == "DELETE":
            await self.change(caller, "scope.deleted", {"scope": name},
                              lambda: self.store.delete_scope(name))
            return self.no_content(request)
        scope = self.parse(codecs.scope_from_json, self.json_body(request), self.reserved_claims)
        if scope.scope != name:
            self.audit(caller, "scope.updated", {"scope": name}, "refused", "body names another scope")
            raise bad_request("the body names another scope than the path")

        await self.change(caller, "scope.updated", {"scope": name}, lambda: self.store.update_scope(scope),
                          missing=True)
        return self.no_content(request)

    # -- integrations and API keys --------------------------------------------

    @app.route(f"{PREFIX}/integrations", methods=["GET", "POST"])
    async def integrations(self, request: IRequest) -> bytes:
        route = f"{PREFIX}/integrations"
        if self.enter(request, route, "GET", "POST") == "GET":
            await self.authorise(request, route, READ)
            found = await self.store.list_integrations()
            return json_response(request, [codecs.integration_to_json(i) for i in found])
        caller = await self.authorise(request, route, APIKEYS_WRITE)
        body = self.json_body(request)
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        integration_id = body.get("integrationId")
        if not isinstance(integration_id, str) or not apikeys.valid_id(integration_id):
            raise bad_request("integrationId must be 1 to 64 letters, digits, '-' or '_'")
        description = self.description(body)
        try:
            profiles = apikeys.bound_profiles(body.get("profiles"), self.api_key_profiles)
        except ValueError as error:
            raise bad_request(str(error)) from None
        integration = Integration(integration_id=integration_id, description=description, profiles=profiles)

        await self.change(caller, "integration.created", {"integrationId": integration_id},
                          lambda: self.store.add_integration(integration), exists="integration already exists")
        return json_response(request, codecs.integration_to_json(integration), 201)

    @app.route(f"{PREFIX}/integrations/<path:_rest>", methods=ANY_METHOD)
    async def integration_keys(self, request: IRequest, _rest: str) -> bytes:
        segments = self.segments(request, "/integrations/")
        if len(segments) == 2 and segments[1] == "keys":
            route = f"{PREFIX}/integrations/{{id}}/keys"
            self.enter(request, route, "POST")
            return await self.create_key(request, route, segments[0])
        if len(segments) == 3 and segments[1] == "keys":
            route = f"{PREFIX}/integrations/{{id}}/keys/{{keyId}}"
            self.enter(request, route, "DELETE")
            caller = await self.authorise(request, route, APIKEYS_WRITE)
            integration_id, key_id = segments[0], segments[2]
            await self.change(
                caller, "apikey.revoked", {"integrationId": integration_id, "keyId": key_id},
                lambda: self.store.revoke_api_key(integration_id, key_id),
            )
            return self.no_content(request)
        raise not_found()

    async def create_key(self, request: IRequest, route: str, integration_id: str) -> bytes:
        caller = await self.authorise(request, route, APIKEYS_WRITE)
        body = self.json_body(request)
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        tier = body.get("tier", 0)
        if not apikeys.valid_tier(tier):
            raise bad_request(f"tier must be an integer from 0 to {apikeys.MAX_TIER}")
        description = self.description(body)
        key_id = body.get("keyId")
        if key_id is not None and (not isinstance(key_id, str) or not apikeys.valid_id(key_id)):
            raise bad_request("keyId must be 1 to 64 letters, digits, '-' or '_'")
        new = apikeys.make_key(self.api_key_prefix, integration_id, key_id, self.random_bytes)
        record = ApiKeyRecord(
            integration_id=integration_id,
            key_id=new.key_id,
            secret_sha256=new.secret_sha256,
            tier=tier,
            description=description,
        )

        await self.change(caller, "apikey.created", {"integrationId": integration_id, "keyId": new.key_id},
                          lambda: self.store.add_api_key(record), exists="keyId already exists", missing=True)
        return json_response(request, {"keyId": new.key_id, "apiKey": new.text}, 201)

    # -- the rest ---------------------------------------------------------------

    @app.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> bytes:
        if not self.metrics_enabled:
            raise not_found()
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        return self.metrics.exposition()

    def description(self, body: Mapping[str, JSONValue]) -> str:
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > codecs.MAX_IDENTIFIER:
            raise bad_request(f"description must be a string of at most {codecs.MAX_IDENTIFIER} characters")
        return description

    def segments(self, request: IRequest, collection: str) -> list[str]:
        try:
            return path_segments(request, PREFIX + collection)
        except UnicodeDecodeError:
            raise bad_request("path segments must be UTF-8") from None

    def no_content(self, request: IRequest) -> bytes:
        request.setResponseCode(204)
        return b""

    add_health_routes(app)
    add_error_handlers(app, plain_error)
