"""
Calling a Kubernetes API server the way both of jwtlet's callers do
(TokenReview in the ``kubernetes-tokenreview`` validator, TokenRequest in a
target cluster): a JSON POST carrying jwtlet's own credential (its
service-account token, or what a kubeconfig gives), and one retry with the
credential fetched again when the API server answers 401, because the
kubelet may have rotated the file under us or an exec plugin's token may
have been revoked.
"""

from __future__ import annotations

import json
from typing import Optional

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime

from jwtlet import strictjson
from jwtlet.interfaces import DependencyUnavailable
from jwtlet.kubernetes.credentials import Credential, as_credential
from jwtlet.model import JSONObject, JSONValue
from jwtlet.outbound import RequestHeaders, on_clock, read_answer


@attrs.frozen
class APIServer:
    """
    One API server and the credential jwtlet presents to it.

    :ivar credential: what ``own_token`` is, for messages ("own service
        account token").
    """

    url: str
    #: a token file, or any :class:`~jwtlet.kubernetes.credentials.Credential`
    own_token: Credential = attrs.field(converter=as_credential)
    http_client: HTTPClient
    clock: IReactorTime
    timeout: float
    credential: str = "own service account token"

    async def token(self, refresh: bool = False) -> Optional[str]:
        """
        The bearer token to present (fetched again when ``refresh``;
        ``None``: a client certificate authenticates); none to be had is
        :class:`DependencyUnavailable`.
        """
        try:
            return await self.own_token.bearer(refresh)
        except (OSError, ValueError) as error:
            raise DependencyUnavailable(f"{self.credential}: {error}") from None

    async def post(self, path: str, body: JSONObject, peer: str) -> tuple[int, JSONValue]:
        """
        POST ``body`` to ``path``; the status and the decoded answer (``None``
        when it is not JSON).  Connection failures and timeouts are
        :class:`DependencyUnavailable`, named after ``peer``.
        """
        code, answer = await self._post(path, body, peer, await self.token())
        if code == 401:
            code, answer = await self._post(path, body, peer, await self.token(refresh=True))
        return code, answer

    async def _post(self, path: str, body: JSONObject, peer: str, bearer: Optional[str]) -> tuple[int, JSONValue]:
        headers: RequestHeaders = {"Content-Type": ["application/json"], "Accept": ["application/json"]}
        if bearer is not None:
            headers["Authorization"] = [f"Bearer {bearer}"]
        try:
            response = await self.http_client.post(
                self.url + path, data=json.dumps(body).encode(), headers=headers, timeout=self.timeout,
                reactor=on_clock(self.clock),
            )
            content = await read_answer(response, self.timeout, self.clock)
        except CancelledError:
            raise DependencyUnavailable(f"{peer}: timed out") from None
        except Exception as error:
            raise DependencyUnavailable(f"{peer}: {type(error).__name__}") from None
        try:
            # A hostile or broken peer (deeply nested JSON, huge numbers) must
            # not raise anything but "not JSON" here.
            return response.code, strictjson.loads(content)
        except ValueError:
            return response.code, None
