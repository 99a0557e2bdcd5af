"""Bearer JWTs from an identity provider, verified against a JWKS (a file or a URL).

Optional (``pip install agent-kernel-gateway[jwt]``) and off unless ``jwt_jwks`` is set. The
principal's name comes from ``jwt_principal_claim`` (default ``sub``); its role from
``jwt_role_claim`` (default ``role``), through ``jwt_role_map`` when the provider's values are
not the gateway's role names (a list claim, such as groups, takes its strongest mapped role).
Tokens must be signed (RS*, ES*, PS*, EdDSA), unexpired, and match the configured audience and
issuer when those are set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.errors import AuthenticationRequired
from gateway.inputs import is_text

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]
ROLE_STRENGTH = {"reviewer": 1, "agent": 2, "admin": 3}


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class JwtVerifier:
    """Checks bearer JWTs; built once from the settings when ``jwt_jwks`` is set."""

    def __init__(self, jwks: str, *, audience: str | None, issuer: str | None, principal_claim: str,
                 role_claim: str, role_map: dict[str, str]):
        import jwt

        self.jwt = jwt
        self.audience = audience
        self.issuer = issuer
        self.principal_claim = principal_claim
        self.role_claim = role_claim
        self.role_map = role_map
        if jwks.startswith(("https://", "http://")):
            self.client: Any = jwt.PyJWKClient(jwks, cache_keys=True)
            self.keys: dict[str, Any] = {}
        else:
            self.client = None
            data = json.loads(Path(jwks).read_text(encoding="utf-8"))
            self.keys = {key.get("kid", str(index)): jwt.PyJWK(key) for index, key in enumerate(data["keys"])}

    def _key(self, token: str) -> Any:
        if self.client is not None:
            return self.client.get_signing_key_from_jwt(token).key
        kid = self.jwt.get_unverified_header(token).get("kid")
        if kid in self.keys:
            return self.keys[kid].key
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values())).key
        raise AuthenticationRequired("The token was not signed by a key this gateway trusts.", code="invalid_token")

    def principal(self, token: str) -> tuple[str, str]:
        """(name, role) of a valid token; ``AuthenticationRequired`` saying why otherwise."""
        jwt = self.jwt
        try:
            claims = jwt.decode(token, self._key(token), algorithms=ALGORITHMS, audience=self.audience,
                                issuer=self.issuer, options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise AuthenticationRequired("The token has expired; get a new one from your identity provider.",
                                         code="invalid_token") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationRequired("The token is not meant for this gateway (audience).",
                                         code="invalid_token") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationRequired("The token comes from an issuer this gateway does not trust.",
                                         code="invalid_token") from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise AuthenticationRequired(f"The token is not valid: {exc}.", code="invalid_token") from None
        name = claims.get(self.principal_claim)
        if not isinstance(name, str) or not name or not is_text(name):
            raise AuthenticationRequired(f"The token has no '{self.principal_claim}' claim (Unicode text) to name "
                                         "its principal.", code="invalid_token")
        return name, self._role(claims.get(self.role_claim))

    def _role(self, value: Any) -> str:
        values = value if isinstance(value, list) else [value]
        roles = [self.role_map.get(str(v), str(v)) for v in values if v is not None]
        roles = [role for role in roles if role in ROLE_STRENGTH]
        if not roles:
            raise AuthenticationRequired(f"The token's '{self.role_claim}' claim maps to no role of this gateway "
                                         "(agent, reviewer, admin).", code="invalid_token")
        return max(roles, key=ROLE_STRENGTH.__getitem__)
