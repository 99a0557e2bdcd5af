"""Bearer JWTs from an identity provider, verified against a JWKS file, with keys the test makes."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.conftest import GatewayProcess, error_code, start_gateway


def new_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, Any]]:
    key = new_key()
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="test-key", alg="RS256", use="sig")
    folder = tmp_path_factory.mktemp("idp")
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public]}))
    proc = start_gateway(folder / "data", extra_args=(
        "--pool-size", "0", "--jwt-jwks", str(jwks), "--jwt-audience", "agent-gateway",
        "--jwt-issuer", "https://idp.example", "--jwt-principal-claim", "email", "--jwt-role-claim", "groups",
        "--jwt-role-map", json.dumps({"data-science": "agent", "audit": "reviewer"})))
    yield proc, key
    assert proc.stop() == 0


def token(key: Any, **claims: Any) -> str:
    body = {"email": "ada@example.com", "groups": ["data-science"], "aud": "agent-gateway",
            "iss": "https://idp.example", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "test-key"})


def call(proc: GatewayProcess, bearer: str, method: str = "GET", path: str = "/v1/sessions", **kw: Any) -> httpx.Response:
    return httpx.request(method, proc.url + path, headers={"Authorization": f"Bearer {bearer}"}, timeout=60, **kw)


def test_a_valid_token_names_the_principal_and_its_role(idp: tuple[GatewayProcess, Any]) -> None:
    proc, key = idp
    created = call(proc, token(key), "POST", "/v1/sessions", json={})
    assert created.status_code == 201, created.text
    assert created.json()["owner"] == "ada@example.com"
    other = call(proc, token(key, email="bob@example.com"))
    assert created.json()["id"] not in [s["id"] for s in other.json()["sessions"]]
    reviewer = token(key, email="rita@example.com", groups=["audit"])
    assert created.json()["id"] in [s["id"] for s in call(proc, reviewer).json()["sessions"]]
    assert call(proc, reviewer, "POST", "/v1/sessions", json={}).status_code == 403
    call(proc, token(key), "DELETE", f"/v1/sessions/{created.json()['id']}")


@pytest.mark.parametrize("why, claims, signer", [
    ("expired", {"exp": int(time.time()) - 10}, None),
    ("audience", {"aud": "someone-else"}, None),
    ("issuer", {"iss": "https://evil.example"}, None),
    ("no role", {"groups": ["marketing"]}, None),
    ("no name", {"email": None}, None),
    ("wrong key", {}, "other"),
])
def test_bad_tokens_are_refused(idp: tuple[GatewayProcess, Any], why: str, claims: dict[str, Any],
                                signer: str | None) -> None:
    proc, key = idp
    signing = new_key() if signer else key
    response = call(proc, token(signing, **claims))
    assert response.status_code == 401, why
    assert error_code(response) == "invalid_token"


def test_stored_tokens_keep_working_beside_jwts(idp: tuple[GatewayProcess, Any]) -> None:
    proc, _ = idp
    assert call(proc, proc.token).status_code == 200
    assert call(proc, "eyJ.not.valid").status_code == 401
