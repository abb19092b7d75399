"""
The token exchange site (default port 8080): ``POST /token``, the JWKS and the
metadata documents.  Handlers parse and render; the decision is the issuer's.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Optional
from urllib.parse import parse_qs

import attrs
from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import NotFound

from jwtlet import policy
from jwtlet._async import as_deferred
from jwtlet.exchange.apikeys import ApiKeyExchange, InvalidKey, UnknownProfile
from jwtlet.exchange.pipeline import TokenIssuer
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.policy import ExchangeError
from jwtlet.web.common import (
    NO_STORE,
    APIError,
    BodyLimits,
    Readiness,
    add_error_handlers,
    add_health_routes,
    json_response,
    media_type,
    read_body,
    unavailable_headers,
)

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


def error_body(error: ExchangeError) -> dict[str, str]:
    if not error.description:
        return {"error": error.code}
    return {"error": error.code, "error_description": error.description}


def error_headers(error: ExchangeError) -> dict[str, str]:
    headers = dict(NO_STORE)
    if error.retry_after is not None:
        headers.update(unavailable_headers(error.retry_after))
    return headers


def metadata(issuer: str, algorithm: str) -> dict[str, Any]:
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

    issuer: TokenIssuer
    signer: Any
    issuer_url: str
    require_subject_token_type: bool
    readiness: Readiness
    ext_authz: Optional[IResource] = None
    api_keys: Optional[ApiKeyExchange] = None

    @app.handle_errors(ExchangeError)
    def exchange_error(self, request: IRequest, failure: Any) -> bytes:
        error: ExchangeError = failure.value
        return json_response(request, error_body(error), error.status, error_headers(error))

    @app.route("/token", methods=["POST"])
    async def token(self, request: IRequest) -> bytes:
        try:
            body = read_body(request, MAX_BODY)
        except APIError as error:
            error.headers = {**error.headers, **NO_STORE}
            raise
        if media_type(request) != FORM:
            raise policy.invalid_request(f"the body must be {FORM}")
        token_request = policy.parse_token_request(parse_form(body), self.require_subject_token_type)
        if token_request.is_api_key:
            return await self.api_key_via_token_endpoint(request, token_request)
        issued = await self.issuer.exchange(token_request)
        response: dict[str, Any] = {
            "access_token": issued.access_token,
            "issued_token_type": policy.TOKEN_TYPE_JWT,
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
        }
        if issued.scope:
            response["scope"] = issued.scope
        return json_response(request, response, 200, NO_STORE)

    async def api_key_via_token_endpoint(self, request: IRequest, token_request: policy.TokenRequest) -> bytes:
        """The API-key exchange reached through RFC 8693, with RFC 6749 errors."""
        if self.api_keys is None:
            raise policy.invalid_request("unsupported subject_token_type")
        try:
            token = await self.api_keys.exchange(token_request.resource, token_request.subject_token)
            profile = self.api_keys.profile(token_request.resource)
        except UnknownProfile:
            raise ExchangeError("invalid_target", "unknown API-key profile") from None
        except InvalidKey:
            raise policy.invalid_grant("subject token rejected") from None
        except DependencyUnavailable as error:
            raise policy.temporarily_unavailable(error.retry_after) from None
        response = {
            "access_token": token,
            "issued_token_type": policy.TOKEN_TYPE_JWT,
            "token_type": "Bearer",
            "expires_in": profile.ttl_secs,
        }
        return json_response(request, response, 200, NO_STORE)

    @app.route("/v0/token/<profile>", methods=["POST"])
    async def api_key_token(self, request: IRequest, profile: str) -> bytes:
        """``{"api_key": ...}`` in, ``{"token": ...}`` out (the M-Lab contract)."""
        if self.api_keys is None:
            raise NotFound()
        body = read_body(request, MAX_BODY)
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            document = None
        # An absent key is a missing key (401); one present but not a string
        # (null included) is a malformed body.
        if not isinstance(document, dict) or not isinstance(document.get("api_key", ""), str):
            raise APIError(400, {"error": "invalid request body"}, NO_STORE)
        key = document.get("api_key")
        try:
            token = await self.api_keys.exchange(profile, key)
        except UnknownProfile:
            raise APIError(404, {"error": "unknown profile"}, NO_STORE) from None
        except InvalidKey:
            raise APIError(401, {"error": "invalid API key"}, NO_STORE) from None
        except ExchangeError as error:
            raise APIError(error.status, {"error": error.code}, error_headers(error)) from None
        return json_response(request, {"token": token}, 200, NO_STORE)

    @app.route("/.well-known/jwks.json", methods=["GET"])
    async def jwks(self, request: IRequest) -> bytes:
        keys = await as_deferred(self.signer.public_jwks())
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
    add_error_handlers(app)
