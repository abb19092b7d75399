"""
A fake OIDC issuer: discovery and JWKS over HTTP, and tokens shaped like the
ones the workload identities of workload-identity.md carry, with the claims
each issuer documents -- GitHub Actions (``token.actions.githubusercontent.com``),
GitLab CI (``id_tokens``), SPIFFE JWT-SVIDs (SPIRE's OIDC discovery provider)
and another Kubernetes cluster's projected service-account tokens.

Serve :meth:`FakeOIDCIssuer.resource` in memory with
:class:`jwtlet.testing.memory.MemoryNetwork` at the issuer's own URL, or on
loopback with :func:`jwtlet.testing.loopback.serve` (then set ``url``, and
``issuer`` too unless the validator is given a ``discoveryURL``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any, ClassVar, Optional

import attrs
from jwcrypto.common import json_encode
from jwcrypto.jws import JWS
from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from jwtlet.testing.kubernetes import SigningKey

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
GITLAB_ISSUER = "https://gitlab.com"
SPIFFE_ISSUER = "https://oidc.spire.acme.example"
CLUSTER_B_ISSUER = "https://cluster-b.acme.example"

Claims = dict[str, Any]


@attrs.define
class FakeOIDCIssuer:
    """One issuer's keys, tokens and HTTP face (``app``)."""

    app: ClassVar[Klein] = Klein()

    issuer: str
    #: where discovery and JWKS are served (``jwks_uri`` points here); default: ``issuer``
    url: Optional[str] = None
    clock: Any = None
    keys: list[SigningKey] = attrs.field(factory=lambda: [SigningKey.generate()])
    #: the ``issuer`` the discovery document names; default: ``issuer``
    discovery_issuer: Optional[str] = None
    #: when set, discovery and JWKS answer with this status
    failure_status: Optional[int] = None
    requests: Counter[str] = attrs.field(factory=Counter)

    # -- tokens ------------------------------------------------------------------

    def now(self) -> int:
        return int(self.clock.seconds() if self.clock is not None else time.time())

    def jwks(self) -> Claims:
        return {"keys": [key.public() for key in self.keys]}

    def sign(self, claims: Claims, key: Optional[SigningKey] = None, header: Optional[Claims] = None) -> str:
        key = key or self.keys[0]
        protected = header if header is not None else {"alg": key.algorithm, "kid": key.kid, "typ": "JWT"}
        jws = JWS(json_encode(claims).encode())
        jws.add_signature(key.key, alg=protected.get("alg", key.algorithm), protected=json_encode(protected))
        return str(jws.serialize(compact=True))

    def registered(self, audience: Any, ttl: int = 300, issued_at: Optional[int] = None) -> Claims:
        """``iss``, ``aud``, ``iat``, ``nbf``, ``exp`` and ``jti`` for a token issued now (or at ``issued_at``)."""
        issued = self.now() if issued_at is None else issued_at
        return {"iss": self.issuer, "aud": audience, "iat": issued, "nbf": issued, "exp": issued + ttl,
                "jti": str(uuid.uuid4())}

    def github_actions(self, audience: str, repository: str = "acme/app", ref: str = "refs/heads/main",
                       environment: Optional[str] = None, **claims: Any) -> Claims:
        """
        A GitHub Actions job's token (``ACTIONS_ID_TOKEN_REQUEST_URL``): one
        audience string, ``sub`` naming the environment when the job has one.
        """
        owner = repository.split("/")[0]
        context = f"environment:{environment}" if environment else f"ref:{ref}"
        shaped: Claims = {
            **self.registered(audience),
            "sub": f"repo:{repository}:{context}",
            "ref": ref, "ref_type": "branch", "ref_protected": "true", "sha": "d1f5a6c0" * 5,
            "repository": repository, "repository_id": "690123456", "repository_owner": owner,
            "repository_owner_id": "9919", "repository_visibility": "private", "actor": "octocat",
            "actor_id": "583231", "run_id": "8765432101", "run_number": "42", "run_attempt": "1",
            "workflow": "deploy", "event_name": "push", "head_ref": "", "base_ref": "",
            "workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
            "job_workflow_ref": f"{repository}/.github/workflows/deploy.yml@{ref}",
            "runner_environment": "github-hosted",
        }
        if environment:
            shaped["environment"] = environment
        return {**shaped, **claims}

    def gitlab_ci(self, audience: str, project_path: str = "acme/app", ref: str = "main", **claims: Any) -> Claims:
        """A GitLab CI job's ``id_tokens`` token."""
        namespace = project_path.rsplit("/", 1)[0]
        return {
            **self.registered(audience),
            "sub": f"project_path:{project_path}:ref_type:branch:ref:{ref}",
            "namespace_id": "72", "namespace_path": namespace, "project_id": "20", "project_path": project_path,
            "user_id": "5", "user_login": "alice", "user_email": "alice@acme.example", "user_access_level": "developer",
            "pipeline_id": "1212", "pipeline_source": "push", "job_id": "4242", "ref": ref, "ref_type": "branch",
            "ref_path": f"refs/heads/{ref}", "ref_protected": "true", "runner_id": 1,
            "runner_environment": "gitlab-hosted", "sha": "714a629c" * 5, "project_visibility": "private",
            "ci_config_ref_uri": f"gitlab.com/{project_path}//.gitlab-ci.yml@refs/heads/{ref}",
            **claims,
        }

    def spiffe_svid(self, audience: str, spiffe_id: str = "spiffe://acme.example/ns/payments/sa/api",
                    **claims: Any) -> Claims:
        """A JWT-SVID: the SPIFFE ID in ``sub``, ``aud`` an array."""
        return {**self.registered([audience], ttl=300), "sub": spiffe_id, **claims}

    def service_account(self, audience: str, namespace: str = "payments", name: str = "api",
                        pod: str = "api-7c9d-x2x4q", **claims: Any) -> Claims:
        """Another cluster's projected service-account token, bound to a pod."""
        issued = self.now()
        return {
            **self.registered([audience], ttl=3600, issued_at=issued),
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}/{name}"))},
                "pod": {"name": pod, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, pod))},
                "warnafter": issued + 3600,
            },
            **claims,
        }

    # -- HTTP --------------------------------------------------------------------

    def resource(self) -> IResource:
        return self.app.resource()

    def _reply(self, request: IRequest, endpoint: str, body: Claims) -> bytes:
        self.requests[endpoint] += 1
        request.setHeader(b"Content-Type", b"application/json")
        if self.failure_status is not None:
            request.setResponseCode(self.failure_status)
            return b'{"error": "unavailable"}'
        return json.dumps(body).encode()

    @app.route("/.well-known/openid-configuration", methods=["GET"])
    def discovery(self, request: IRequest) -> bytes:
        return self._reply(request, "discovery", {
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": f"{self.url or self.issuer}/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public", "pairwise"],
            "id_token_signing_alg_values_supported": sorted({key.algorithm for key in self.keys}),
        })

    @app.route("/jwks", methods=["GET"])
    def jwks_document(self, request: IRequest) -> bytes:
        return self._reply(request, "jwks", self.jwks())
