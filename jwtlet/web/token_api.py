"""
The token exchange site (default port 8080): ``POST /token``, the JWKS and the
metadata documents.  Handlers parse and render; the decision is the exchange's,
and :func:`jwtlet.web.errors.token_port_error` says its refusals.
"""

from __future__ import annotations

from typing import ClassVar, Optional
from urllib.parse import parse_qs

import attrs
from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import NotFound

from jwtlet import policy, strictjson
from jwtlet.exchange.pipeline import Exchange, IssuedToken
from jwtlet.model import JSONObject
from jwtlet.providers import Signer
from jwtlet.web.errors import APIError, add_error_handlers, token_port_error
from jwtlet.web.health import Readiness, add_health_routes
from jwtlet.web.introspect import Introspection
from jwtlet.web.requests import media_type, read_body
from jwtlet.web.responses import NO_STORE, json_response
from jwtlet.web.server import BodyLimits

MAX_BODY = 64 * 1024
EXT_AUTHZ_PREFIX = "/ext_authz/"
# Enforced by the site while a body arrives; Envoy sends ext_authz checks without one.
BODY_LIMITS = BodyLimits(MAX_BODY, {EXT_AUTHZ_PREFIX.encode(): 0})
MAX_FORM_FIELDS = 64
FORM = "application/x-www-form-urlencoded"


def parse_form(body: bytes) -> dict[str, list[str]]:
    """
    An urlencoded body as name -> every value; malformed input is
    ``invalid_request``.  Only the body: parameters in the query string are
    never mixed in, and names like ``a[b][c]`` are plain names.
    """
    try:
        text = body.decode("utf-8")
        return parse_qs(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise policy.invalid_request("malformed form body") from None


def token_response(issued: IssuedToken) -> JSONObject:
    """The RFC 8693 success body, whatever the credential was."""
    response: JSONObject = {
        "access_token": issued.access_token,
        "issued_token_type": policy.TOKEN_TYPE_JWT,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    }
    if issued.scope:
        response["scope"] = issued.scope
    return response


def metadata(issuer: str, algorithm: str) -> JSONObject:
    """RFC 8414 authorization server metadata (also served as OIDC discovery)."""
    return {
        "issuer": issuer,
        "token_endpoint": f"{issuer}/token",
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "grant_types_supported": [policy.GRANT_TYPE_TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["token"],
        "id_token_signing_alg_values_supported": [algorithm],
    }


@attrs.define
class TokenExchangeAPI:
    """The Klein app of the token exchange port."""

    app: ClassVar[Klein] = Klein()

    exchange: Exchange
    signer: Signer
    issuer_url: str
    require_subject_token_type: bool
    readiness: Readiness
    introspection: Introspection
    ext_authz: Optional[IResource] = None

    @app.route("/token", methods=["POST"])
    async def token(self, request: IRequest) -> bytes:
        body = read_body(request, MAX_BODY)
        if media_type(request) != FORM:
            raise policy.invalid_request(f"the body must be {FORM}")
        exchange_request = policy.parse_token_request(parse_form(body), self.require_subject_token_type)
        issued = await self.exchange.exchange(exchange_request)
        return json_response(request, token_response(issued), 200, NO_STORE)

    @app.route("/introspect", methods=["POST"])
    async def introspect(self, request: IRequest) -> bytes:
        """RFC 7662, for services that would otherwise link a validation library (migration.md)."""
        body = read_body(request, MAX_BODY)
        if media_type(request) != FORM:
            raise policy.invalid_request(f"the body must be {FORM}")
        return await self.introspection.answer(request, parse_form(body))

    @app.route("/v0/token/<profile>", methods=["POST"])
    async def api_key_token(self, request: IRequest, profile: str) -> bytes:
        """``{"api_key": ...}`` in, ``{"token": ...}`` out (the M-Lab contract)."""
        if self.exchange.api_keys is None:
            raise NotFound()
        body = read_body(request, MAX_BODY)
        try:
            document = strictjson.loads(body)
        except ValueError:
            document = None
        # An absent key is a missing key (401); one present but not a string
        # (null included) is a malformed body.
        if not isinstance(document, dict) or not isinstance(document.get("api_key", ""), str):
            raise APIError(400, {"error": "invalid request body"})
        exchange_request = policy.ExchangeRequest(
            subject_token=document.get("api_key", ""),
            subject_token_type=policy.TOKEN_TYPE_API_KEY,
            resource=profile,
        )
        issued = await self.exchange.exchange(exchange_request)
        return json_response(request, {"token": issued.access_token}, 200, NO_STORE)

    @app.route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(self, request: IRequest) -> bytes:
        keys = await self.signer.public_jwks()
        return json_response(request, keys, 200, {"Cache-Control": "public, max-age=300"})

    @app.route("/.well-known/oauth-authorization-server", methods=["GET"])
    def authorization_server_metadata(self, request: IRequest) -> bytes:
        return json_response(request, metadata(self.issuer_url, self.signer.algorithm))

    @app.route("/.well-known/openid-configuration", methods=["GET"])
    def openid_configuration(self, request: IRequest) -> bytes:
        return json_response(request, metadata(self.issuer_url, self.signer.algorithm))

    @app.route(EXT_AUTHZ_PREFIX, branch=True)
    def ext_authz_http(self, request: IRequest) -> IResource:
        """Envoy's HTTP-mode checks, served by the ext_authz front when it is on."""
        if self.ext_authz is None:
            raise NotFound()
        return self.ext_authz

    add_health_routes(app)
    add_error_handlers(app, token_port_error)
